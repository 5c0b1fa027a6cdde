"""Bad input through the public API, as a table: each case names the error it must raise.

Every case runs on real tiny networks and checks three things: the error is a
`StitchError` whose message matches, no hook is left on any module, and the
networks are bitwise unchanged. Cases that used to fail but are valid input
(networks of different precisions, a list of ready-made batches) are in
`WORKS` beside them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import modelstitch as ms
from modelstitch import zoo
from tests.helpers import no_hooks_left, same_state, state_snapshot

X = torch.randn(2, 3, 32, 32)


def _nets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "a": zoo.small_resnet("R1111", width=4).eval(),
        "b": zoo.small_resnet("R1111", width=4).eval(),
        "tv": torchvision.models.resnet18(num_classes=10).eval(),
    }


def _stitch(a: nn.Module, b: nn.Module, **kw) -> ms.StitchedModel:
    return ms.stitch(a, "layer1.0", b, "layer1.0", example_input=X, **kw)


# (case, call on the networks, regex the StitchError message must match)
FAILS: list[tuple[str, Callable[[dict[str, nn.Module]], object], str]] = [
    ("unknown layer", lambda n: ms.stitch(n["a"], "layer9", n["b"], "stem", example_input=X), r"no layer 'layer9'"),
    (
        "unbatched example_input",
        lambda n: ms.stitch(n["a"], "layer1.0", n["b"], "layer1.0", example_input=torch.randn(3, 32, 32)),
        r"example_input \(3, 32, 32\).*batch dimension first.*unsqueeze\(0\)",
    ),
    (
        "[images, labels] as example_input",
        lambda n: ms.stitch(n["a"], "layer1.0", n["b"], "layer1.0", example_input=[X, torch.zeros(2)]),
        r"got a list of 2 items; for a batch \[images, labels\] pass the images tensor alone",
    ),
    (
        "torch.compile'd sender",
        lambda n: ms.stitch(torch.compile(n["a"]), "layer1.0", n["b"], "layer1.0", example_input=X),
        r"torch.compile wrapper.*pass model._orig_mod",
    ),
    (
        "DataParallel-wrapped receiver",
        lambda n: ms.stitch(n["a"], "layer1.0", nn.DataParallel(n["b"]), "layer1.0", example_input=X),
        r"no layer 'layer1.0'.*'module.layer1.0'.*pass model.module",
    ),
    (
        "call index past the last call",
        lambda n: ms.activations(n["tv"], X, ["layer1.0.relu:2"]),
        r"'layer1.0.relu' runs 2 time\(s\) per forward; valid calls: 'layer1.0.relu:0' ... 'layer1.0.relu:1'",
    ),
    (
        "call index past the last call, probed",
        lambda n: ms.layer_specs(n["tv"], X, ["layer1.0.relu:2"]),
        r"runs 2 time\(s\) per forward",
    ),
    (
        "module called twice, bare name",
        lambda n: ms.activations(n["tv"], X, ["layer1.0.relu"]),
        r"runs more than once per forward; address one call as 'layer1.0.relu:0', 'layer1.0.relu:1'",
    ),
    (
        "SQL through a rows() keyword",
        lambda n: _store(n).rows(**{"1=1 OR sender": "x"}),
        r"unknown column\(s\) \['1=1 OR sender'\]; the columns are \['sender', 'sender_layer'",
    ),
    (
        "labels out of range",
        lambda n: ms.train_stitch(
            _stitch(n["a"], n["b"]),
            [(torch.randn(8, 3, 32, 32), torch.full((8,), 12))],
            recipe=ms.Recipe(epochs=1, batch_size=8),
            device="cpu",
            progress=False,
        ),
        r"labels must be class indices 0..9 for the receiver's 10 outputs; this batch has labels from 12 to 12",
    ),
    (
        "NaN activations into least squares",
        lambda n: ms.fit_least_squares(
            _stitch(n["a"], n["b"]), [(torch.full((4, 3, 32, 32), float("nan")), torch.zeros(4, dtype=torch.long))]
        ),
        r"least-squares init saw NaN or infinite activations",
    ),
    (
        "a pair that raises stops the study, named",
        lambda n: _failing_study(n).run(progress=False),
        r"pair a -> b failed: StitchError: .*no layer 'nope'.*--keep-going",
    ),
    (
        "wrong channel count at run time",
        lambda n: _stitch(n["a"], n["b"])(torch.randn(2, 5, 32, 32)),
        r"cell SmallResNet\['layer1.0'\] -> SmallResNet\['layer1.0'\] failed: .*5 channels",
    ),
]


def _store(n: dict[str, nn.Module]) -> ms.study.ResultStore:
    import tempfile

    return ms.study.ResultStore(Path(tempfile.mkdtemp()) / "s.sqlite")


def _failing_study(n: dict[str, nn.Module], **kw) -> ms.Study:
    import tempfile

    from modelstitch import data

    small = data.subset(data.digits(), 16)
    return ms.Study(
        {"a": n["a"], "b": n["b"]},
        train_data=small,
        test_data=small,
        out=tempfile.mkdtemp(),
        pairs=[("a", "b")],
        layers={"a": ["stem"], "b": ["nope"]},
        recipe=ms.Recipe(epochs=1, batch_size=8),
        device="cpu",
        sanity=False,
        **kw,
    )


@pytest.mark.parametrize("name, call, message", FAILS, ids=[c[0] for c in FAILS])
def test_bad_input_raises_a_clear_error(name, call, message):
    nets = _nets()
    before = {k: state_snapshot(m) for k, m in nets.items()}
    with pytest.raises(ms.StitchError, match=message):
        call(nets)
    for key, net in nets.items():
        assert no_hooks_left(net), key
        assert same_state(net, before[key]), key


def _precision(sender_dtype: torch.dtype, receiver_dtype: torch.dtype) -> Callable[[dict[str, nn.Module]], object]:
    def run(n: dict[str, nn.Module]) -> torch.Tensor:
        a, b = copy.deepcopy(n["a"]).to(sender_dtype), copy.deepcopy(n["b"]).to(receiver_dtype)
        s = _stitch(a, b)
        assert s.stitch.core.weight.dtype == sender_dtype  # built in the sender's dtype
        out = s(X)
        assert out.dtype == receiver_dtype
        return out

    return run


def _list_of_batches(n: dict[str, nn.Module]) -> object:
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(3)]
    result = ms.train_stitch(
        _stitch(n["a"], n["b"]), batches, recipe=ms.Recipe(epochs=2, batch_size=8), device="cpu", progress=False
    )
    assert result.steps == 6  # three ready-made batches per epoch, not batches of batches
    return result


WORKS: list[tuple[str, Callable[[dict[str, nn.Module]], object]]] = [
    ("fp16 sender, fp32 receiver", _precision(torch.float16, torch.float32)),
    ("fp64 sender, fp32 receiver", _precision(torch.float64, torch.float32)),
    ("fp32 sender, fp64 receiver", _precision(torch.float32, torch.float64)),
    ("bf16 sender, bf16 receiver", _precision(torch.bfloat16, torch.bfloat16)),
    ("a list of ready-made batches as data", _list_of_batches),
]


@pytest.mark.parametrize("name, call", WORKS, ids=[c[0] for c in WORKS])
def test_valid_input_that_used_to_fail_works(name, call):
    nets = _nets()
    before = {k: state_snapshot(m) for k, m in nets.items()}
    call(nets)
    for key, net in nets.items():
        assert no_hooks_left(net), key
        assert same_state(net, before[key]), key


def test_old_top_level_names_warn_and_still_work():
    with pytest.warns(DeprecationWarning, match=r"modelstitch.ResultStore moved to modelstitch.study.ResultStore"):
        store_class = ms.ResultStore
    assert store_class is ms.study.ResultStore


def test_keep_going_records_the_failure_and_the_cli_exits_non_zero(tmp_path, capsys):
    study = _failing_study(_nets())
    study.run(progress=False, keep_going=True)
    (failure,) = study.failures()
    assert (failure["sender"], failure["receiver"]) == ("a", "b")
    assert "no layer 'nope'" in failure["error"]


def test_cli_refuses_a_data_root_the_preset_does_not_read(tmp_path, capsys):
    from modelstitch import cli

    code = cli.main(["study", "run", "--preset", "quick", "--data-root", str(tmp_path), "--out", str(tmp_path / "r")])
    assert code == 2
    assert "reads no --data-root" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
