"""Credits: what a plan's allowances are counted in.

Each model has coefficients for input, cached input and output tokens, and a multiplier for
the configured peak hours; a plan may override them per model (admin API). Tokens are recorded
exactly; the ledger derives the billed credits from them at the coefficients fixed when the
request was admitted (migrations/0030). The defaults, 1 / 0.2 / 1, are the token billing of
before: a credit is a token, a cached prompt token a fifth of one.

Adding a model is configuration: CODEPLAN_MODELS_FILE lists models with their context window,
output limit and coefficients; at start-up they join the bridge's catalog and their
coefficients are written to `model_credits`.
"""
from __future__ import annotations

import datetime as dt
from typing import Annotated

import asyncpg
import msgspec

from bridge import models as bridge_models

# Admission fixes coefficient x peak multiplier on the ledger row, in numeric(12, 6) columns
# (usage_ledger.coeff_*, migrations/0030): below 10^6. Past it every admission of the model
# fails at peak hours, so both are bounded where they enter (this file's models, the admin API)
# with 9,999 x 100 = 999,900 the most they can make.
MAX_COEFFICIENT = 9_999
MAX_PEAK_MULTIPLIER = 100
Coefficient = Annotated[float, msgspec.Meta(ge=0, le=MAX_COEFFICIENT)]
PeakMultiplier = Annotated[float, msgspec.Meta(ge=1, le=MAX_PEAK_MULTIPLIER)]


class Coefficients(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    input: Coefficient = 1.0
    cached: Coefficient = 0.2
    output: Coefficient = 1.0
    peak_multiplier: PeakMultiplier = 1.0


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]
    display_name: str = ""
    context_window: Annotated[int, msgspec.Meta(ge=1)]
    max_output: Annotated[int, msgspec.Meta(ge=1)]
    credits: Coefficients = Coefficients()
    # release date, seconds since the epoch (shown by /v1/models)
    released: int = 0


class ModelsFile(msgspec.Struct, forbid_unknown_fields=True):
    models: list[ModelConfig]


DEFAULT_MODELS = [
    ModelConfig(id=m.id, display_name=m.display_name, context_window=m.context_window,
                max_output=m.max_output) for m in bridge_models.CATALOG.values()
]


def install(models: list[ModelConfig]) -> None:
    """Make the bridge serve these models (called once at start-up, before any request)."""
    bridge_models.install([bridge_models.ModelInfo(m.id, m.display_name or m.id, m.context_window, m.max_output)
                           for m in models], {m.id: m.released for m in models if m.released})


async def sync(pool: asyncpg.Pool, models: list[ModelConfig], *, configured: set[str],
               peak: tuple[dt.time, dt.time] | None, zone: str) -> None:
    """Write the models' coefficients and the peak hours where the ledger reads them. The
    built-in models are only added when missing (an operator's change stays); the models of the
    models file are the configuration's word and overwrite."""
    async with pool.acquire() as conn, conn.transaction():
        for m in models:
            c = m.credits
            await conn.execute(
                "INSERT INTO model_credits (model, input_coeff, cached_coeff, output_coeff, peak_multiplier)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (model) DO " + (
                    "UPDATE SET input_coeff = excluded.input_coeff, cached_coeff = excluded.cached_coeff,"
                    " output_coeff = excluded.output_coeff, peak_multiplier = excluded.peak_multiplier,"
                    " updated_at = now()" if m.id in configured else "NOTHING"),
                m.id, c.input, c.cached, c.output, c.peak_multiplier)
        await conn.execute(
            "UPDATE credit_settings SET peak_start = $1, peak_end = $2, peak_zone = $3",
            peak[0] if peak else None, peak[1] if peak else None, zone)


class ModelCredits(msgspec.Struct):
    input: float
    cached: float
    output: float
    peak_multiplier: float


_PLAN_CREDITS_SQL = """
SELECT m.model, coalesce(pc.input_coeff, m.input_coeff) AS input,
       coalesce(pc.cached_coeff, m.cached_coeff) AS cached,
       coalesce(pc.output_coeff, m.output_coeff) AS output,
       coalesce(pc.peak_multiplier, m.peak_multiplier) AS peak_multiplier
  FROM model_credits m
  LEFT JOIN plan_credits pc ON pc.model = m.model AND pc.plan_id = $1
 WHERE m.model = ANY($2::text[])
 ORDER BY m.model
"""


async def plan_credits(conn, plan_id: str, models: list[str]) -> dict[str, ModelCredits]:
    """The coefficients a plan bills its models at (before any peak multiplier)."""
    return {r["model"]: ModelCredits(float(r["input"]), float(r["cached"]), float(r["output"]),
                                     float(r["peak_multiplier"]))
            for r in await conn.fetch(_PLAN_CREDITS_SQL, plan_id, models)}
