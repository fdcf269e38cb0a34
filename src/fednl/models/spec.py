"""What a strategy asks the engine to build: a model kind and that kind's own parameters.

``ModelSpec(kind="floral", params={"n_adaptors": 3})``; :func:`fednl.models.build.build_model` looks the kind up
in the registry its files fill and passes the parameters to its builder as keyword arguments.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ModelSpec(BaseModel):
    """A registered model kind (``"titans"``, ``"lora"``, ``"floral"``, ...) plus its builder's parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, spec: ModelSpec | str) -> ModelSpec:
        """A spec from itself or from a bare kind name (no parameters)."""
        return spec if isinstance(spec, ModelSpec) else cls(kind=spec)

    @property
    def label(self) -> str:
        """``"floral(n_adaptors=3)"``; the bare kind when there are no parameters."""
        if not self.params:
            return self.kind
        return f"{self.kind}({', '.join(f'{k}={v}' for k, v in sorted(self.params.items()))})"
