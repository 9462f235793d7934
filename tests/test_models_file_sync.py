"""CODEPLAN_MODELS_FILE is the configuration's word for the models it names, whatever they say
(even the built-in defaults); the built-in models it does not name keep an operator's change.
Real bridge subprocess, real PostgreSQL."""
from __future__ import annotations

from service import config as config_module

from .conftest import query, run, start_bridge

ENTRY = ('[[models]]\nid = "{id}"\ndisplay_name = "GLM-4.6"\ncontext_window = 204800\nmax_output = 131072\n'
         'credits = {{ input = 1, cached = 0.2, output = 1, peak_multiplier = {peak} }}\n')


def _coefficients(database: str, model: str) -> tuple[float, ...]:
    row = run(query(database, "SELECT * FROM model_credits WHERE model = $1", model))[0]
    return (float(row["input_coeff"]), float(row["cached_coeff"]), float(row["output_coeff"]),
            float(row["peak_multiplier"]))


def _restart(database: str, upstream: str, models_file: str) -> None:
    start_bridge(database, upstream, CODEPLAN_MODELS_FILE=models_file).stop()


def test_a_models_file_entry_equal_to_the_default_still_overwrites(fresh_database, simulator, tmp_path):
    """Was: an entry equal to the built-in default was taken for a built-in model and only
    added when missing, so a peak surcharge the operator took off in the file stayed (peak
    hours billed double). Now every model the file names is written."""
    upstream = simulator.url + "/api/paas/v4"
    models = tmp_path / "models.toml"
    # an operator's change of a built-in model the file does not name (the admin API's kind)
    _restart(fresh_database, upstream, "")
    run(query(fresh_database, "UPDATE model_credits SET input_coeff = 3 WHERE model = 'glm-4.5-air'"))
    # 1. the file doubles GLM-4.6 at peak hours
    models.write_text(ENTRY.format(id="glm-4.6", peak=2))
    _restart(fresh_database, upstream, str(models))
    assert _coefficients(fresh_database, "glm-4.6") == (1, 0.2, 1, 2)
    # 2. and takes the surcharge off again: the entry now equals the built-in default (named in
    # capitals: ids are compared as the catalog keeps them, lower case)
    models.write_text(ENTRY.format(id="GLM-4.6", peak=1))
    _restart(fresh_database, upstream, str(models))
    assert _coefficients(fresh_database, "glm-4.6") == (1, 0.2, 1, 1)
    # a built-in model the file does not name keeps the operator's change
    assert _coefficients(fresh_database, "glm-4.5-air")[0] == 3


def test_the_catalog_says_which_models_the_file_names(tmp_path):
    models = tmp_path / "models.toml"
    models.write_text(ENTRY.format(id="GLM-4.6", peak=1) + ENTRY.format(id="my-model", peak=1.5))
    catalog = config_module.read_model_catalog(
        config_module.load({"CODEPLAN_DATABASE_URL": "postgresql://x/y", "CODEPLAN_MODELS_FILE": str(models)}))
    assert catalog.from_file == {"glm-4.6", "my-model"}
    ids = [m.id for m in catalog.models]
    assert len(ids) == len(set(ids)) and {"glm-4.6", "glm-4.5-air", "my-model"} <= set(ids)
    without = config_module.read_model_catalog(config_module.load({"CODEPLAN_DATABASE_URL": "postgresql://x/y"}))
    assert without.from_file == frozenset() and {m.id for m in without.models} == set(ids) - {"my-model"}
