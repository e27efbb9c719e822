"""The parameters, declared once: the flow's form, the model and the command line agree; the
words for 'none'; overlapping folders; messages naming options or form fields."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from flows.image_search import image_search
from flows.params import DEFAULTS, SearchParams, format_validation_error, overlap_message
from tasks.errors import ImageSearchError, option_name, param, worded


def _without(prop: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in prop.items() if k not in keys}


def test_the_flow_form_is_the_model() -> None:
    """Same names in the same order, same types, bounds, descriptions and defaults."""
    form = image_search.parameters.model_dump()["properties"]
    model = SearchParams.model_json_schema()["properties"]
    assert list(form) == list(model)
    for name in model:
        assert _without(form[name], "title", "position") == _without(model[name], "title"), name
    signature = inspect.signature(image_search.fn)
    assert {n: p.default for n, p in signature.parameters.items()} == DEFAULTS.model_dump()


@pytest.mark.parametrize("word", ["none", "None", "", " none "])
def test_none_words_mean_the_default_for_optional_parameters(word: str) -> None:
    params = SearchParams(limit=word, data_dir=word, gpu_memory_fraction=word, backends=[word])
    assert (params.limit, params.data_dir, params.gpu_memory_fraction, params.backends) == (
        None,
        None,
        None,
        None,
    )


def test_none_is_a_value_of_weights() -> None:
    assert SearchParams(weights="none").weights == "none"
    with pytest.raises(ValidationError, match="weights\\x00 must be 'imagenet', 'none' or a path"):
        SearchParams(weights="  ")


def test_backends_are_deduplicated_in_order() -> None:
    assert SearchParams(backends=["numpy", "faiss", "numpy"]).backends == ["numpy", "faiss"]


@pytest.mark.parametrize(
    ("out", "data", "how"),
    [
        ("x", "x", "is the same folder as"),
        ("x", "x/cache", "holds"),
        ("x/out", "x", "lies inside"),
        ("x/../x/out", "x", "lies inside"),
    ],
)
def test_overlapping_folders(tmp_path: Path, out: str, data: str, how: str) -> None:
    a, b = tmp_path / out, tmp_path / data
    message = overlap_message(a, b)
    assert message is not None
    assert worded(message, option_name) == (
        f"The output folder {a.resolve()} (--out) {how} the data cache {b.resolve()} "
        f"(--data-dir); choose two separate folders."
    )
    with pytest.raises(ValidationError, match="choose two separate folders"):
        SearchParams(out=str(a), data_dir=str(b))


def test_overlap_follows_symlinks(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert overlap_message(tmp_path / "link", tmp_path / "real" / "c") is not None


@pytest.mark.parametrize(("out", "data"), [("x", "y"), ("x", "xy"), ("a/x", "a/y")])
def test_separate_folders_pass(tmp_path: Path, out: str, data: str) -> None:
    assert overlap_message(tmp_path / out, tmp_path / data) is None
    assert SearchParams(out=str(tmp_path / out), data_dir=str(tmp_path / data)).data_dir


def test_messages_name_settings_as_each_reader_knows_them() -> None:
    """The work names settings; the command line words them as options, everyone else as form
    fields; what a message quotes (a path with dashes and braces) is never taken for one."""
    text = f"lower {param('k')}, use {param('split_ratio')} 0.5 for /data/--out-{{k}}/x"
    assert worded(text) == "lower k, use split_ratio 0.5 for /data/--out-{k}/x"
    assert worded(text, option_name) == "lower --k, use --split-ratio 0.5 for /data/--out-{k}/x"
    exc = ImageSearchError(text)
    assert str(exc) == worded(text)
    assert exc.worded(option_name) == worded(text, option_name)


def test_validation_errors_name_each_parameter_and_value() -> None:
    with pytest.raises(ValidationError) as caught:
        SearchParams(k="0", backends=["numpy", "annoy"], source="")
    assert worded(format_validation_error(caught.value), option_name) == (
        "invalid parameters:\n"
        "  --source = '': String should have at least 1 character\n"
        "  --backends = annoy: Input should be "
        "'cuml', 'sklearn', 'faiss', 'numpy' or 'certified'\n"
        "  --k = 0: Input should be greater than or equal to 1"
    )
    assert worded(format_validation_error(caught.value)).splitlines()[-1] == (
        "  k = 0: Input should be greater than or equal to 1"
    )
