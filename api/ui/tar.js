// Reads the files of a .tar.gz in the browser (DecompressionStream + the ustar/pax
// layout), so the job page can show the model card from the adapter archive that
// GET /v1/jobs/{id}/adapter returns, without an API call of its own.

const BLOCK = 512;
const decoder = new TextDecoder();

function field(header, start, length) {
  const bytes = header.subarray(start, start + length);
  const end = bytes.indexOf(0);
  return decoder.decode(end < 0 ? bytes : bytes.subarray(0, end));
}

// pax extended header records: "<length> <key>=<value>\n"
function paxPath(data) {
  for (const record of decoder.decode(data).split("\n")) {
    const match = /^\d+ path=(.*)$/.exec(record);
    if (match) return match[1];
  }
  return null;
}

// Map of path -> Uint8Array for every regular file in the archive.
export async function readTarGz(blob) {
  const stream = blob.stream().pipeThrough(new DecompressionStream("gzip"));
  const bytes = new Uint8Array(await new Response(stream).arrayBuffer());
  const files = new Map();
  let offset = 0;
  let nextName = null; // from a pax ("x") or GNU long-name ("L") header
  while (offset + BLOCK <= bytes.length) {
    const header = bytes.subarray(offset, offset + BLOCK);
    if (header.every((byte) => byte === 0)) break;
    const size = parseInt(field(header, 124, 12).trim() || "0", 8);
    const type = String.fromCharCode(header[156] || 48);
    const data = bytes.subarray(offset + BLOCK, offset + BLOCK + size);
    let name = field(header, 0, 100);
    const prefix = field(header, 345, 155);
    if (field(header, 257, 5) === "ustar" && prefix) name = `${prefix}/${name}`;
    if (type === "x") nextName = paxPath(data) ?? nextName;
    else if (type === "L") nextName = field(data, 0, data.length);
    else {
      if (type === "0" || type === "7") files.set(nextName ?? name, data);
      nextName = null;
    }
    offset += BLOCK + Math.ceil(size / BLOCK) * BLOCK;
  }
  return files;
}

export const text = (bytes) => decoder.decode(bytes);
