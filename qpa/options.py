"""Building blocks of the job config's sections (pydantic only: no torch, no qiskit).

Every section rejects unknown keys so that a typo never silently falls back to a default.
Method folders define their own section from these (``qpa/methods/<name>/options.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    #: The learning rate ``train.lr`` defaults to when the job's method owns this section
    #: (the quality frontier's choice, docs/BENCHMARKS.md section 4).
    LEARNING_RATE: ClassVar[float | None] = None

    #: The module set (``qpa.models.TARGET_SETS``) a job of this method adapts when it leaves
    #: ``lora.target_modules`` out.
    TARGET_SET: ClassVar[str] = "attention_qv"

    @property
    def target_set(self) -> str:
        return self.TARGET_SET

    @property
    def learning_rate(self) -> float:
        if self.LEARNING_RATE is None:
            raise NotImplementedError(f"{type(self).__name__} names no learning rate")
        return self.LEARNING_RATE


class PresetSection(Section):
    """A section with named operating points: the chosen preset fills in every option the
    job leaves out (options the job sets win), and names the learning rate ``train.lr``
    and the module set ``lora.target_modules`` default to. Presets come from the quality
    frontier (docs/BENCHMARKS.md)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    LEARNING_RATES: ClassVar[dict[str, float]] = {}
    #: What the frontier measured for each preset, quoted by the model card.
    MEASURED: ClassVar[dict[str, str]] = {}
    #: Presets whose module set differs from the section's ``TARGET_SET``.
    TARGET_SETS: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("preset", cls.model_fields["preset"].default)
        if not isinstance(name, str) or name not in cls.PRESETS:
            return data  # the preset field's Literal reports the allowed names
        return {**cls.PRESETS[name], **data, "preset": name}

    @property
    def learning_rate(self) -> float:
        return self.LEARNING_RATES[self.preset]

    @property
    def target_set(self) -> str:
        return self.TARGET_SETS.get(self.preset, self.TARGET_SET)

    def matches_preset(self) -> bool:
        """True when no option differs from the preset (the measured point applies)."""
        return self.model_dump() == type(self)(preset=self.preset).model_dump()


