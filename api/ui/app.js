// The QPA dashboard: sign in with an API key, list jobs, watch one live, create one.
// A hash router (#/jobs, #/jobs/<id>, #/new) over the public REST API; no build step.

import * as api from "./api.js";
import { renderLossChart } from "./chart.js";
import { readTarGz, text } from "./tar.js";
import { dump as yamlDump, load as yamlLoad } from "./vendor/js-yaml.min.js";

const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const FORMAT_LABELS = { peft: "PEFT adapter", merged: "Merged model", gguf: "GGUF adapter" };
const BACKEND_GROUPS = { simulator: "Simulators", ibm: "IBM Quantum", fake: "IBM fake backends (local testing)" };
const FORM_KEYS = ["base_model", "method", "backend", "steps"];

const main = document.getElementById("main");
let current = null; // AbortController of the view on screen

// -- small DOM helpers: text always goes in as text, never as HTML ----------------------

function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "class") element.className = value;
    else if (value === true) element.setAttribute(name, "");
    else element.setAttribute(name, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });

// Local time, to the second (or the minute, in tables).
function when(iso, seconds = true) {
  if (!iso) return "—";
  const date = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} `
    + `${pad(date.getHours())}:${pad(date.getMinutes())}${seconds ? `:${pad(date.getSeconds())}` : ""}`;
}

function number(value, digits = 4) {
  if (value === null || value === undefined) return "—";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  return Number(value.toPrecision(digits)).toString();
}

const badge = (status) => h("span", { class: "badge", "data-status": status }, status);

function alertBox(message) {
  return h("p", { class: "alert", role: "alert" }, message);
}

function showError(container, error) {
  container.replaceChildren(alertBox(error instanceof Error ? error.message : String(error)));
}

// A 401 means the key was revoked, expired or mistyped: back to the sign-in page.
function handleAuth(error) {
  if (error instanceof api.ApiError && error.status === 401) {
    api.session.signOut();
    renderSignIn(`Your API key was refused (${error.message}); sign in again.`);
    return true;
  }
  return false;
}

// -- router ----------------------------------------------------------------------------

function route() {
  current?.abort();
  current = new AbortController();
  const { signal } = current;
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query ?? "");
  if (!api.session.key) {
    renderSignIn();
    return;
  }
  document.getElementById("nav").hidden = false;
  const jobMatch = /^\/jobs\/([^/]+)$/.exec(path);
  const run = jobMatch ? jobView(decodeURIComponent(jobMatch[1]), signal)
    : path === "/new" ? newJobView(signal)
      : jobsView(params.get("status") ?? "", signal);
  run.catch((error) => {
    if (error.name === "AbortError" || signal.aborted || handleAuth(error)) return;
    showError(main, error);
  });
}

// -- sign in ---------------------------------------------------------------------------

function renderSignIn(message) {
  current?.abort();
  document.getElementById("nav").hidden = true;
  const input = h("input", { id: "api-key", type: "password", name: "api-key", autocomplete: "off",
    required: true, placeholder: "qpa-…", "aria-describedby": "key-help" });
  const feedback = h("div", { id: "sign-in-feedback" }, message ? alertBox(message) : null);
  const form = h("form", { id: "sign-in", class: "card narrow", onsubmit: async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    feedback.replaceChildren();
    try {
      await api.checkKey(key);
    } catch (error) {
      feedback.replaceChildren(alertBox(error.message));
      return;
    }
    api.session.signIn(key);
    if (!location.hash || location.hash === "#/" || location.hash === "#") location.hash = "#/jobs";
    else route();
  } },
  h("h1", {}, "Sign in"),
  h("label", { for: "api-key" }, "API key"),
  input,
  h("p", { id: "key-help", class: "hint" }, "Create one with ", h("code", {}, "qpa keys create"),
    ". The key stays in this browser tab only (session storage) and goes to the API as ",
    h("code", {}, "Authorization: Bearer …"), "."),
  h("button", { type: "submit", class: "primary" }, "Sign in"),
  feedback);
  main.replaceChildren(form);
  input.focus();
}

document.getElementById("sign-out").addEventListener("click", () => {
  api.session.signOut();
  history.replaceState(null, "", "#/jobs"); // no hashchange: the next key starts at its list
  renderSignIn("Signed out.");
});

// -- the jobs table --------------------------------------------------------------------

async function jobsView(status, signal) {
  const filter = h("select", { id: "status-filter", "aria-label": "Filter by status",
    onchange: () => { location.hash = filter.value ? `#/jobs?status=${filter.value}` : "#/jobs"; } },
  h("option", { value: "" }, "All statuses"),
  STATUSES.map((name) => h("option", { value: name, selected: name === status }, name)));
  const body = h("tbody");
  const table = h("table", { id: "jobs-table", class: "jobs" },
    h("thead", {}, h("tr", {}, ["Job", "Status", "Method", "Backend", "Progress", "Eval loss",
      "Quantum jobs / shots", "Created", "Finished"].map((name) => h("th", { scope: "col" }, name)))),
    body);
  const empty = h("p", { id: "jobs-empty", class: "empty", hidden: true });
  const more = h("button", { id: "load-more", hidden: true }, "Load more");
  const feedback = h("div");
  main.replaceChildren(h("section", {},
    h("div", { class: "toolbar" }, h("h1", {}, "Jobs"), filter,
      h("a", { class: "button primary", href: "#/new" }, "New job")),
    feedback, h("div", { class: "table-wrap" }, table), empty, more));

  let jobs = [];
  let hasMore = false;
  const render = () => {
    body.replaceChildren(...jobs.map(jobRow));
    table.hidden = jobs.length === 0;
    empty.hidden = jobs.length > 0;
    empty.replaceChildren(status ? `No ${status} jobs.`
      : h("span", {}, "No jobs yet. ", h("a", { href: "#/new" }, "Create one"), "."));
    more.hidden = !hasMore;
  };
  more.addEventListener("click", async () => {
    try {
      const page = await api.listJobs({ limit: 20, after: jobs.at(-1)?.id, status, signal });
      jobs = jobs.concat(page.data);
      hasMore = page.has_more;
      render();
    } catch (error) {
      if (!handleAuth(error)) showError(feedback, error);
    }
  });
  // Refresh the rows on screen: every 2 s while a job is live, else every 10 s.
  while (!signal.aborted) {
    try {
      const page = await api.listJobs({ limit: Math.min(100, Math.max(20, jobs.length)), status, signal });
      jobs = page.data;
      hasMore = page.has_more;
      feedback.replaceChildren();
      render();
    } catch (error) {
      if (error.name === "AbortError" || handleAuth(error)) return;
      showError(feedback, error);
    }
    await sleep(jobs.some((job) => !TERMINAL.has(job.status)) ? 2000 : 10000, signal);
  }
}

function progressCell(job) {
  const { step, total_steps: total } = job.progress;
  return h("span", { class: "progress-cell" },
    h("progress", { max: total || 1, value: step }), ` ${step} / ${total}`);
}

function jobRow(job) {
  return h("tr", { "data-job-id": job.id, "data-status": job.status },
    h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "mono" }, job.id)),
    h("td", {}, badge(job.status)),
    h("td", {}, job.method),
    h("td", {}, job.backend),
    h("td", {}, progressCell(job)),
    h("td", { class: "num" }, number(job.progress.eval_loss)),
    h("td", { class: "num" }, `${number(job.quantum.jobs)} / ${number(job.quantum.shots)}`),
    h("td", {}, when(job.created_at, false)),
    h("td", {}, when(job.finished_at, false)));
}

// -- one job, live ---------------------------------------------------------------------

async function jobView(jobId, signal) {
  let job;
  try {
    job = await api.getJob(jobId, signal);
  } catch (error) {
    if (error instanceof api.ApiError && error.status === 404) {
      main.replaceChildren(h("section", { id: "job-missing" }, h("h1", {}, "Job not found"),
        alertBox(error.message), h("p", {}, h("a", { href: "#/jobs" }, "Back to your jobs"))));
      return;
    }
    throw error;
  }
  const part = (id, title, ...children) => h("section", { id, class: "card" }, h("h2", {}, title), ...children);
  const header = h("div", { class: "job-header" });
  const actions = h("div", { class: "actions", id: "job-actions" });
  const feedback = h("div", { id: "job-feedback" });
  const summary = h("dl", { class: "facts", id: "job-summary" });
  const chart = h("div", { id: "loss-chart", class: "chart" });
  const quantum = h("dl", { class: "facts", id: "quantum-usage" });
  const results = h("div", { id: "job-results" });
  const errorBox = h("div", { id: "job-error" });
  const config = h("pre", { id: "job-config", class: "code" });
  const card = h("pre", { class: "code model-card" });
  const cardDetails = h("details", { id: "model-card", ontoggle: () => loadModelCard() },
    h("summary", {}, "Model card (README.md of the PEFT adapter)"), card);
  const cardSection = h("section", { class: "card", hidden: true }, cardDetails);
  const eventsBody = h("tbody");
  const eventsTitle = h("summary", {}, "Events");
  main.replaceChildren(h("article", { class: "job", "data-job-id": jobId },
    h("p", { class: "crumbs" }, h("a", { href: "#/jobs" }, "Jobs"), " / ", h("span", { class: "mono" }, jobId)),
    header, actions, feedback, errorBox,
    h("div", { class: "grid" }, part("job-overview", "Overview", summary),
      part("job-quantum", "Quantum usage", quantum)),
    part("job-chart", "Loss", chart),
    part("job-results-card", "Results", results),
    part("job-config-card", "Config", config),
    cardSection,
    h("section", { class: "card" }, h("details", { id: "job-events" }, eventsTitle,
      h("div", { class: "table-wrap" }, h("table", { class: "events" },
        h("thead", {}, h("tr", {}, ["#", "Time", "Type", "What"].map((name) => h("th", {}, name)))),
        eventsBody))))));

  let cardLoaded = false;
  async function loadModelCard() {
    if (!cardDetails.open || cardLoaded) return;
    cardLoaded = true;
    card.textContent = "Loading the adapter archive…";
    try {
      const { blob } = await api.downloadExport(jobId, "peft");
      const files = await readTarGz(blob);
      const readme = [...files.keys()].find((name) => name.replace(/^\.\//, "") === "adapter/README.md");
      card.textContent = readme ? text(files.get(readme)) : "The archive has no adapter/README.md.";
    } catch (error) {
      cardLoaded = false;
      card.textContent = `Could not load the model card: ${error.message}`;
    }
  }

  function update(next) {
    job = next;
    header.replaceChildren(h("h1", {}, h("span", { class: "mono" }, job.id)),
      h("span", { id: "job-status" }, badge(job.status)),
      h("span", { class: "note", hidden: !job.cancel_requested || TERMINAL.has(job.status) }, "cancel requested"));
    const { progress } = job;
    summary.replaceChildren(...[
      ["Method", job.method], ["Backend", job.backend], ["Base model", job.base_model],
      ["Progress", progressCell(job)], ["Train loss", number(progress.loss)],
      ["Eval loss", number(progress.eval_loss)], ["Checkpoint", progress.checkpoint_step ?? "—"],
      ["Created", when(job.created_at)], ["Started", when(job.started_at)],
      ["Finished", when(job.finished_at)], ["Attempts", job.attempts],
    ].flatMap(([name, value]) => [h("dt", {}, name), h("dd", {}, value)]));
    quantum.replaceChildren(...[
      ["Jobs", number(job.quantum.jobs)], ["Circuits", number(job.quantum.circuits)],
      ["Shots", number(job.quantum.shots)], ["Seconds", number(job.quantum.seconds)],
    ].flatMap(([name, value]) => [h("dt", {}, name), h("dd", { "data-field": name.toLowerCase() }, value)]));
    errorBox.replaceChildren(...(job.error ? [h("pre", { class: "alert code", role: "alert" }, job.error)] : []));
    results.replaceChildren(resultsTable(job.metrics));
    config.textContent = yamlDump(job.config, { lineWidth: 100 });
    cardSection.hidden = job.status !== "succeeded";
    renderActions();
  }

  function renderActions() {
    const buttons = [];
    if (!TERMINAL.has(job.status) && !job.cancel_requested) {
      buttons.push(h("button", { id: "cancel-job", class: "danger", onclick: async (event) => {
        event.target.disabled = true;
        try {
          update(await api.cancelJob(jobId));
        } catch (error) {
          if (!handleAuth(error)) showError(feedback, error);
          event.target.disabled = false;
        }
      } }, "Cancel job"));
    }
    // Every export format the job was asked for; a failed or cancelled job has none.
    const formats = ["failed", "cancelled"].includes(job.status) ? [] : job.config?.export?.formats ?? ["peft"];
    for (const format of formats) {
      const ready = job.status === "succeeded";
      buttons.push(h("button", { class: "download", "data-format": format, disabled: !ready,
        title: ready ? `GET /v1/jobs/${job.id}/adapter?format=${format}` : "Available once the job has succeeded",
        onclick: (event) => download(event.target, format) }, `Download ${FORMAT_LABELS[format] ?? format}`));
    }
    actions.replaceChildren(...buttons);
  }

  async function download(button, format) {
    button.disabled = true;
    const label = button.textContent;
    button.textContent = "Preparing…";
    try {
      const { blob, filename } = await api.downloadExport(jobId, format);
      const link = h("a", { href: URL.createObjectURL(blob), download: filename, hidden: true });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 60000);
    } catch (error) {
      if (!handleAuth(error)) showError(feedback, error);
    } finally {
      button.textContent = label;
      button.disabled = false;
    }
  }

  // Loss series from the events: a step seen twice (a job resumed from its checkpoint
  // after its worker died) keeps its latest value.
  const trainLoss = new Map();
  const evalLoss = new Map();
  const events = [];
  let drawPending = false;
  const draw = () => {
    drawPending = false;
    const sorted = (map) => [...map.entries()].sort((a, b) => a[0] - b[0]);
    renderLossChart(chart, { train: sorted(trainLoss), evaluation: sorted(evalLoss) });
    eventsTitle.textContent = `Events (${events.length})`;
    eventsBody.replaceChildren(...events.slice(-200).map(eventRow));
  };
  const scheduleDraw = () => {
    if (!drawPending) {
      drawPending = true;
      requestAnimationFrame(draw);
    }
  };
  let refreshTimer = null;
  const refresh = async () => {
    refreshTimer = null;
    try {
      update(await api.getJob(jobId, signal));
    } catch (error) {
      if (error.name !== "AbortError" && !handleAuth(error)) showError(feedback, error);
    }
  };
  const scheduleRefresh = () => { refreshTimer ??= setTimeout(refresh, 300); };
  signal.addEventListener("abort", () => clearTimeout(refreshTimer));

  update(job);
  draw();
  let cursor = 0;
  while (!signal.aborted) {
    let ended = false;
    try {
      ended = await api.streamEvents(jobId, { after: cursor, signal, onEvent: (event) => {
        cursor = event.id;
        events.push(event);
        const { data } = event;
        if (event.type === "step" && typeof data.loss === "number") trainLoss.set(data.step, data.loss);
        if (event.type === "eval" && typeof data.eval_loss === "number") evalLoss.set(data.step, data.eval_loss);
        scheduleDraw();
        scheduleRefresh();
      } });
      feedback.replaceChildren();
    } catch (error) {
      if (error.name === "AbortError" || signal.aborted || handleAuth(error)) return;
      feedback.replaceChildren(alertBox(`Live updates interrupted (${error.message}); reconnecting…`));
    }
    if (ended) break;
    await sleep(2000, signal);
  }
  clearTimeout(refreshTimer);
  if (!signal.aborted) await refresh();
}

function eventRow(event) {
  const { data } = event;
  let what = data.message ?? data.status ?? "";
  if (event.type === "step") what = `step ${data.step}/${data.total_steps}: loss ${number(data.loss)}`;
  else if (event.type === "eval") what = `step ${data.step}: eval loss ${number(data.eval_loss)}`;
  else if (event.type === "checkpoint") what = `checkpoint at step ${data.step}`;
  else if (event.type === "done") what = "training finished";
  return h("tr", { "data-type": event.type }, h("td", { class: "num" }, event.id),
    h("td", {}, when(event.created_at)), h("td", {}, event.type), h("td", {}, what));
}

function resultsTable(metrics) {
  if (!metrics) return h("p", { class: "hint" }, "Results appear when the job has finished.");
  const rows = Object.entries(metrics).filter(([, value]) =>
    value === null || ["number", "string", "boolean"].includes(typeof value)
      || (Array.isArray(value) && value.every((item) => typeof item !== "object")));
  return h("dl", { class: "facts results" }, rows.map(([name, value]) => [
    h("dt", {}, name.replaceAll("_", " ")),
    h("dd", { "data-metric": name }, Array.isArray(value) ? value.join(", ") : number(value))]));
}

// -- a new job -------------------------------------------------------------------------

async function newJobView(signal) {
  const field = (label, control, hint) => h("div", { class: "field" },
    h("label", { for: control.id }, label), control, hint ? h("p", { class: "hint" }, hint) : null);
  const trainInput = h("input", { id: "train-file", type: "file", accept: ".jsonl,.json,application/jsonl", required: true });
  const evalInput = h("input", { id: "eval-file", type: "file", accept: ".jsonl,.json,application/jsonl" });
  const baseModel = h("input", { id: "base-model", value: "smollm2-135m", required: true, spellcheck: "false" });
  const method = h("input", { id: "method", value: "qpa", list: "methods", required: true, spellcheck: "false" });
  const methods = h("datalist", { id: "methods" });
  const backend = h("select", { id: "backend" });
  const steps = h("input", { id: "steps", type: "number", min: 1, value: 100, required: true });
  const options = h("textarea", { id: "options-yaml", rows: 10, spellcheck: "false",
    placeholder: "lora: {r: 4}\nqpa: {chunk_size: 64, depth: 8}\ntrain: {lr: 0.002, batch_size: 4}" });
  const feedback = h("div", { id: "new-job-feedback" });
  const submit = h("button", { type: "submit", class: "primary" }, "Upload and start");
  const form = h("form", { id: "new-job", class: "card", onsubmit: (event) => {
    event.preventDefault();
    create().catch((error) => {
      if (!handleAuth(error)) showError(feedback, error);
    }).finally(() => { submit.disabled = false; });
  } },
  h("h1", {}, "New job"),
  h("div", { class: "grid" },
    field("Training data (JSONL)", trainInput, "One {\"text\"}, {\"prompt\", \"completion\"} or {\"messages\"} object per line."),
    field("Eval data (JSONL, optional)", evalInput, "Without it, 10 % of the training records are held out."),
    field("Base model", baseModel, "An alias such as smollm2-135m, or a model folder the workers can read."),
    field("Method", method), field("Backend", backend), field("Steps", steps)),
  methods,
  field("More options (YAML)", options,
    "Any other keys of the job config (lora, qpa, compound, vera, quantum, train, export …), as in a "
    + "`qpa finetune` file. The fields above are set here, not in the YAML."),
  h("div", { class: "actions" }, submit, h("a", { href: "#/jobs", class: "button" }, "Cancel")),
  feedback);
  main.replaceChildren(form);

  backend.append(h("option", { value: "", disabled: true, selected: true }, "Loading backends…"));
  try {
    methods.replaceChildren(...(await api.listMethods(signal)).map((name) => h("option", { value: name })));
    const backends = await api.listBackends(signal);
    const option = (item) => {
      const why = !item.allowed ? "not allowed on this server" : !item.available ? item.reason ?? "unavailable" : null;
      return h("option", { value: item.name, selected: item.name === backends.default, disabled: Boolean(why),
        title: why ?? item.description }, why ? `${item.name} (${why})` : item.name);
    };
    backend.replaceChildren(...Object.entries(BACKEND_GROUPS).map(([kind, label]) => {
      const items = backends.data.filter((item) => item.kind === kind);
      return items.length ? h("optgroup", { label }, items.map(option)) : null;
    }).filter(Boolean));
  } catch (error) {
    if (error.name === "AbortError" || handleAuth(error)) return;
    showError(feedback, error);
  }

  async function create() {
    feedback.replaceChildren();
    let extra = {};
    if (options.value.trim()) {
      try {
        extra = yamlLoad(options.value);
      } catch (error) {
        throw new Error(`More options: not valid YAML (${error.message})`);
      }
      if (extra === null || typeof extra !== "object" || Array.isArray(extra)) {
        throw new Error("More options: must be a mapping of config keys to values");
      }
      for (const key of [...FORM_KEYS, "train_file", "eval_file"]) {
        if (key in extra) throw new Error(`More options: ${key} is set by the form above; remove it from the YAML`);
      }
    }
    submit.disabled = true;
    const status = (message) => feedback.replaceChildren(h("p", { class: "hint", role: "status" }, message));
    status(`Uploading ${trainInput.files[0].name}…`);
    const train = await api.uploadFile(trainInput.files[0]);
    let evalId;
    if (evalInput.files.length) {
      status(`Uploading ${evalInput.files[0].name}…`);
      evalId = (await api.uploadFile(evalInput.files[0])).id;
    }
    status("Creating the job…");
    const job = await api.createJob({
      base_model: baseModel.value.trim(), method: method.value.trim(), backend: backend.value,
      steps: Number(steps.value), ...extra, train_file: train.id,
      ...(evalId ? { eval_file: evalId } : {}),
    });
    location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
  }
}

window.addEventListener("hashchange", route);
route();
