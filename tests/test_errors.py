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
from torch.utils.data import Dataset, TensorDataset

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
        "NaN inputs into least squares",
        lambda n: ms.fit_least_squares(
            _stitch(n["a"], n["b"]), [(torch.full((4, 3, 32, 32), float("nan")), torch.zeros(4, dtype=torch.long))]
        ),
        r"the least-squares data holds NaN or infinite values: sample 0; remove or repair it",
    ),
    (
        "a pair that raises stops the study, named",
        lambda n: _failing_study(n).run(progress=False),
        r"pair a -> b failed: StitchError: .*layer 'nope' did not produce a tensor.*--keep-going",
    ),
    (
        "empty dataset",
        lambda n: ms.train_stitch(_stitch(n["a"], n["b"]), TensorDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0))),
        r"training data is empty",
    ),
    (
        "dataset too small to hold any out",
        lambda n: ms.train_stitch(_stitch(n["a"], n["b"]), _digits(1), device="cpu", progress=False),
        r"Recipe\(holdout=0.05\) leaves no training samples out of 1",
    ),
    (
        "a NaN training batch",
        lambda n: ms.train_stitch(
            _stitch(n["a"], n["b"]),
            [(torch.full((8, 3, 32, 32), float("nan")), torch.zeros(8, dtype=torch.long))],
            recipe=ms.Recipe(epochs=1, batch_size=8),
            device="cpu",
            progress=False,
        ),
        r"the training data holds NaN or infinite values: sample 0; remove or repair it",
    ),
    (  # the first error on a machine without CUDA, the second on one with fewer than 64 GPUs
        "a CUDA device that is not there",
        lambda n: ms.core.resolve_device("cuda:63"),
        r"is_available\(\) is False|asks for CUDA device 63, but torch sees \d+",
    ),
    ("a device that is not one", lambda n: ms.core.resolve_device("gpu0"), r"device='gpu0' is not a device"),
    ("no example_input", lambda n: ms.stitch(n["a"], "stem", n["b"], "stem", example_input=None), r"needs example_inp"),
    ("unknown stitch kind", lambda n: ms.make_stitch((4, 8, 8), (4, 8, 8), kind="conv9"), r"kind"),
    ("a recipe with lr 0", lambda n: ms.Recipe(lr=0), r"lr must be a finite number > 0, got 0"),
    ("a recipe holding out everything", lambda n: ms.Recipe(holdout=1.0), r"holdout is a fraction"),
    ("unknown objective", lambda n: ms.train_stitch(_stitch(n["a"], n["b"]), _digits(32), objective="l1"), r"'task'"),
    (
        "pairs naming an unknown network",
        lambda n: ms.Study({"a": n["a"]}, train_data=_digits(8), test_data=_digits(8), out="x", pairs=[("a", "z")]),
        r"pairs names 'z', which is not in models",
    ),
    (
        "a network whose layers cannot be guessed",
        lambda n: ms.Study(
            {"mlp": nn.Sequential(nn.Flatten(), nn.Linear(3072, 10))}, train_data=[], test_data=[], out="x"
        ),
        r"pass layers=\{'mlp': \[...\]\}",
    ),
    (
        "unknown executor",
        lambda n: _failing_study(n).run(progress=False, executor="slurm"),
        r"executor='slurm': use one of",
    ),
    (
        "unknown similarity measure",
        lambda n: ms.metrics.compare_layers(n["a"], ["stem"], n["b"], ["stem"], _digits(8), measures=("ckaa",)),
        r"unknown measures",
    ),
    ("a corrupt safetensors file", lambda n: ms.core.load_checkpoint(_garbage(b"not safetensors")), r"not a readable"),
    ("a truncated safetensors file", lambda n: ms.core.load_checkpoint(_truncated(n["a"])), r"not a readable"),
    ("a store from another version", lambda n: ms.study.ResultStore(_old_store()), r"another version of modelstitch"),
    (
        "an output folder under a file",
        lambda n: _failing_study(n, out=_garbage(b"x") / "run").run(progress=False),
        r"cannot use .* as a run folder",
    ),
    (
        "a study layer list as a string",
        lambda n: _layers_study(n, "layer1.0"),
        r"must be a list of layer names such as .*, got 'layer1.0'; for one layer write \['layer1.0'\]",
    ),
    (
        "a study layer named twice",
        lambda n: _layers_study(n, ["stem", "stem", "layer1.0"]),
        r"layers\['a'\] names layer 'stem' more than once",
    ),
    ("an empty study layer list", lambda n: _layers_study(n, []), r"layers\['a'\] is empty"),
    ("an unknown study layer", lambda n: _layers_study(n, ["stem", "layer9"]), r"no layer 'layer9'"),
    (
        "layers of a network not in the study",
        lambda n: _layers_study(n, ["stem"], other="c"),
        r"layers names 'c', which is not in models",
    ),
    ("a network its own control", lambda n: _layers_study(n, ["stem"], controls={"a": "a"}), r"maps 'a' to itself"),
    (
        "a study of controls only",
        lambda n: _layers_study(n, ["stem"], controls={"a": "b", "b": "a"}, pairs="all"),
        r"this study has no cells",
    ),
    (
        "a study objective that is none",
        lambda n: _layers_study(n, ["stem"], objective="l1"),
        r"Study: objective must be one of 'task', 'mse', 'kl', got 'l1'",
    ),
    (
        "a study seed below 0",
        lambda n: _layers_study(n, ["stem"], seed=-1),
        r"Study: seed must be an int in \[0, 2\*\*62\]",
    ),
    (
        "a study evaluation batch of 0",
        lambda n: _layers_study(n, ["stem"], eval_batch_size=0),
        r"Study: eval_batch_size must be an int >= 1, got 0",
    ),
    (
        "a study recipe that is a dict",
        lambda n: _layers_study(n, ["stem"], recipe={"epochs": 1}),
        r"Study: recipe must be a modelstitch.Recipe, got dict",
    ),
    (
        "an output selector on a layer that returns one tensor",
        lambda n: ms.stitch(n["a"], "layer1.0", n["b"], "layer1.0", example_input=X, sender_output=1),
        r"layer 'layer1.0' returns one tensor, so there is nothing for output=1 to select .*drop the selector",
    ),
    (
        "a layer that folds the batch into its rows",
        lambda n: ms.stitch(_Folding(), "fold", _Folding(), "head", example_input=torch.randn(4, 8, 6)),
        r"layer 'fold' gives a tensor of shape \(32, 6\) for example_input's batch of 4; .*batch first",
    ),
    (
        "more inputs than labels",
        lambda n: ms.evaluate(n["a"], [(torch.randn(8, 3, 32, 32), torch.zeros(6, dtype=torch.long))], device="cpu"),
        r"the evaluation data: batch 0 has 8 inputs but 6 labels",
    ),
    (
        "string labels",
        lambda n: ms.evaluate(n["a"], _Named(), device="cpu"),
        r"labels must be a tensor of class indices .*got (list|tuple) such as 'cat'; map them to integers",
    ),
    (
        "float class indices",
        lambda n: ms.evaluate(n["a"], [(torch.randn(4, 3, 32, 32), torch.tensor([0.0, 1.0, 2.0, 3.0]))], device="cpu"),
        r"labels of shape \(4,\) \(torch.float32\) do not fit outputs of shape \(4, 10\)",
    ),
    (
        "NaN in a study's test data",
        lambda n: _layers_study(n, ["stem"], test=_nan_digits(16, at=5), sanity=False).run(progress=False),
        r"the study's test data holds NaN or infinite values: sample 5",
    ),
    (
        "wrong channel count at run time",
        lambda n: _stitch(n["a"], n["b"])(torch.randn(2, 5, 32, 32)),
        r"cell SmallResNet\['layer1.0'\] -> SmallResNet\['layer1.0'\] failed: .*5 channels",
    ),
]


def _digits(count: int) -> Dataset:
    from modelstitch import data

    return data.subset(data.digits(), count)


def _garbage(content: bytes) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "file.safetensors"
    path.write_bytes(content)
    return path


def _truncated(net: nn.Module) -> Path:
    path = _garbage(b"")
    ms.core.save_checkpoint(path, net)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _old_store() -> Path:
    import sqlite3

    path = _garbage(b"").with_name("study.sqlite")
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE cells (sender TEXT)")
    return path


def _store(n: dict[str, nn.Module]) -> ms.study.ResultStore:
    import tempfile

    return ms.study.ResultStore(Path(tempfile.mkdtemp()) / "s.sqlite")


class _WithSpare(nn.Module):
    """A network with a module its forward never calls: a layer that exists but gives nothing at run time."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.nope = net, nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _failing_study(n: dict[str, nn.Module], out: Path | None = None, **kw) -> ms.Study:
    import tempfile

    small = _digits(16)
    return ms.Study(
        {"a": n["a"], "b": _WithSpare(n["b"])},
        train_data=small,
        test_data=small,
        out=out or tempfile.mkdtemp(),
        pairs=[("a", "b")],
        layers={"a": ["stem"], "b": ["nope"]},
        recipe=ms.Recipe(epochs=1, batch_size=8),
        device="cpu",
        sanity=False,
        **kw,
    )


class _Folding(nn.Module):
    """``[B, T, C]`` folded into ``[B*T, C]`` by one layer, unfolded by the next."""

    def __init__(self) -> None:
        super().__init__()
        self.fold, self.head = nn.Flatten(0, 1), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fold(x)).view(x.shape[0], -1, 3).mean(1)


class _Named(Dataset):
    """Images labelled by class name: the default collate gives a list of strings."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return torch.zeros(3, 32, 32), "cat"


def _nan_digits(n: int, at: int) -> TensorDataset:
    x, y = (torch.stack(t) for t in zip(*[_digits(n)[i] for i in range(n)]))
    x[at, 0, 0, 0] = float("nan")
    return TensorDataset(x, y)


def _layers_study(
    n: dict[str, nn.Module], layers: object, other: str = "a", test: Dataset | None = None, **kw
) -> ms.Study:
    """A study refused at construction, before any folder or network work (or, with bad test data, in its run)."""
    import tempfile

    kw = {"pairs": [("a", "b")], **kw}
    return ms.Study(
        {"a": n["a"], "b": n["b"]},
        train_data=_digits(16),
        test_data=_digits(16) if test is None else test,
        out=Path(tempfile.mkdtemp()) / "run",
        layers={other: layers, "b": ["stem"]},
        device="cpu",
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


def test_old_top_level_names_say_where_they_went():
    with pytest.raises(AttributeError, match=r"modelstitch.ResultStore moved to modelstitch.study.ResultStore"):
        ms.ResultStore  # noqa: B018
    assert not hasattr(ms, "LeastSquares") and hasattr(ms.stitches, "LeastSquares")
    with pytest.raises(AttributeError, match="has no attribute 'nonsense'"):
        ms.nonsense  # noqa: B018


def test_keep_going_records_the_failure_and_the_cli_exits_non_zero(tmp_path, capsys):
    study = _failing_study(_nets())
    study.run(progress=False, keep_going=True)
    (failure,) = study.failures()
    assert (failure["sender"], failure["receiver"]) == ("a", "b")
    assert "layer 'nope' did not produce a tensor" in failure["error"]


def test_cli_refuses_a_data_root_the_preset_does_not_read(tmp_path, capsys):
    from modelstitch import cli

    code = cli.main(["study", "run", "--preset", "quick", "--data-root", str(tmp_path), "--out", str(tmp_path / "r")])
    assert code == 2
    assert "reads no --data-root" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
