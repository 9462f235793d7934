"""The models the plans serve, their limits, and how a client's model id resolves to one."""
from __future__ import annotations

import datetime as dt

import msgspec

from .errors import BridgeError, Kind


class ModelInfo(msgspec.Struct, frozen=True):
    id: str
    display_name: str
    context_window: int
    max_output: int


# docs/glm-upstream.md §3: GLM-4.6 200K context (tools configure 204,800), 128K output;
# GLM-4.5 and 4.5-Air 128K context, 96K output.
CATALOG: dict[str, ModelInfo] = {
    m.id: m for m in (
        ModelInfo("glm-4.6", "GLM-4.6", 204_800, 131_072),
        ModelInfo("glm-4.5", "GLM-4.5", 131_072, 98_304),
        ModelInfo("glm-4.5-air", "GLM-4.5-Air", 131_072, 98_304),
    )
}


def install(models: list[ModelInfo], released: dict[str, int] | None = None) -> None:
    """Serve these models (the operator's configuration), at start-up, before any request:
    the catalog is replaced in place so every holder of it sees the same one."""
    CATALOG.clear()
    CATALOG.update((m.id, m) for m in models)
    _RELEASED.update(released or {})


class ModelResolver:
    """Case-insensitive model ids plus operator aliases ("alias=model").

    Raises ValueError, worded as a start-up error line, when a setting names no served model.
    """

    def __init__(self, aliases: tuple[str, ...] = (), *, claude: str = "glm-4.6",
                 claude_haiku: str = "glm-4.5-air") -> None:
        self._claude = claude.lower()
        self._claude_haiku = claude_haiku.lower()
        served = ", ".join(CATALOG)
        for variable, model in (("CODEPLAN_CLAUDE_MODEL", claude), ("CODEPLAN_CLAUDE_HAIKU_MODEL", claude_haiku)):
            if model.lower() not in CATALOG:
                raise ValueError(f"{variable}: expected one of {served}, got {model!r}")
        self._aliases: dict[str, str] = {}
        for pair in aliases:
            alias, _, target = pair.partition("=")
            if target.strip().lower() not in CATALOG:
                raise ValueError(f"CODEPLAN_MODEL_ALIASES: {pair!r} names no model we serve ({served})")
            self._aliases[alias.strip().lower()] = target.strip().lower()

    def resolve(self, requested: str, allowed: tuple[str, ...]) -> ModelInfo:
        wanted = requested.strip().lower()
        wanted = self._aliases.get(wanted, wanted)
        if wanted.startswith("claude"):
            # Claude Code asks for its own ids: opus and sonnet get GLM-4.6, haiku the Air
            wanted = self._claude_haiku if "haiku" in wanted else self._claude
        info = CATALOG.get(wanted)
        if info is None:
            raise BridgeError(Kind.not_found, f"The model `{requested}` does not exist or you do "
                              f"not have access to it. Models: {', '.join(allowed)}", param="model")
        if info.id not in allowed:
            raise BridgeError(Kind.permission, f"The model `{requested}` is not included in your plan",
                              param="model")
        return info


class ListedModel(msgspec.Struct):
    """One model, readable as an OpenAI model object and as an Anthropic one (Claude Code's
    discovery reads `display_name`), with the limits tools configure themselves from."""
    id: str
    object: str
    type: str
    created: int
    created_at: str
    owned_by: str
    display_name: str
    context_window: int
    context_length: int
    max_output_tokens: int


class ModelList(msgspec.Struct):
    object: str
    data: list[ListedModel]
    has_more: bool
    first_id: str | None
    last_id: str | None


_RELEASED = {"glm-4.6": 1759190400, "glm-4.5": 1753747200, "glm-4.5-air": 1753747200}


def listed_model(info: ModelInfo) -> ListedModel:
    """A model as the list shows it, and as `GET /v1/models/{id}` answers it alone."""
    created = _RELEASED.get(info.id, 1759190400)
    return ListedModel(
        id=info.id, object="model", type="model", created=created,
        created_at=dt.datetime.fromtimestamp(created, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        owned_by="zai", display_name=info.display_name, context_window=info.context_window,
        context_length=info.context_window, max_output_tokens=info.max_output)


def model_list(allowed: tuple[str, ...]) -> ModelList:
    listed = [listed_model(CATALOG[model_id]) for model_id in allowed if model_id in CATALOG]
    return ModelList(object="list", data=listed, has_more=False,
                     first_id=listed[0].id if listed else None, last_id=listed[-1].id if listed else None)
