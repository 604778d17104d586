"""One vocabulary: the precision choices, the decoding fields of one mode, one error formatter."""
from __future__ import annotations

import typing

import click
import pytest

from pipeline.core.errors import ParamsError
from pipeline.core.params import Decoding, Params, validated
from pipeline.core.vocabulary import NOT_APPLICABLE, PRECISIONS, Precision


def test_every_precision_choice_is_the_one_vocabulary():
    sections = [Params.model_fields[name].annotation for name in ("clip", "train", "scst", "generate")]
    assert all(section.model_fields["precision"].annotation == Precision for section in sections)
    from stages.caption import caption

    option = next(p for p in caption.params if p.name == "precision")
    assert isinstance(option.type, click.Choice) and tuple(option.type.choices) == PRECISIONS
    assert PRECISIONS == typing.get_args(Precision) == ("auto", "fp32", "bf16", "fp16")


def test_not_applicable_fields_are_off_by_default():
    for key, (off, _) in NOT_APPLICABLE.items():
        assert Decoding.model_fields[key].default == off


@pytest.mark.parametrize("values, message", [
    ({"top_k": 5}, "--top-k: 5 applies only when sampling (--do-sample); leave it at 0 otherwise"),
    ({"length_penalty": 2.0, "num_beams": 1}, "--length-penalty: 2.0 applies only to beam search; --num-beams is 1"),
    ({"num_beams": 0}, "--num-beams: Input should be greater than or equal to 1 (got 0)"),
])
def test_errors_name_each_key_as_the_caller_writes_it(values, message):
    with pytest.raises(ParamsError) as err:
        validated(Decoding, values, name=lambda key: "--" + key.replace("_", "-"))
    assert str(err.value) == message
