"""Every flag, study-file key and preset option is checked where it enters, before any work.

Each row is a wrong type, an out-of-range or a degenerate value: it must fail with a message that names the
field, the value and what is allowed, before a network trains or a folder is made. On the command line
that is exit status 2 and no traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

import modelstitch as ms
from modelstitch import cli
from modelstitch._errors import StitchError
from modelstitch.study import PresetOptions, run_preset, study_from_file

OUT = "{out}"  # replaced by the test's run folder, which must not exist afterwards
CONFIG = "{config}"  # replaced by a valid study file

# ---------------------------------------------------------------- the command line

PRESET = ["study", "run", "--limit", "32", "--epochs", "0.25", "--out", OUT]  # cheap, should a check be missing
ZOO = ["zoo", "train", "R1111", "--limit", "32", "--out", OUT]
SEEDS = r"must be an int in \[0, 2\*\*62\]"

CLI_ROWS: list[tuple[str, list[str], str]] = [
    ("max-pairs negative", [*PRESET, "--max-pairs", "-1"], r"argument --max-pairs: must be an int >= 1, got -1"),
    ("max-pairs zero", [*PRESET, "--max-pairs", "0"], r"argument --max-pairs: must be an int >= 1, got 0"),
    ("max-pairs not an int", [*PRESET, "--max-pairs", "all"], r"--max-pairs: must be an int >= 1, got 'all'"),
    ("zoo epochs zero", [*ZOO, "--epochs", "0"], r"argument --epochs: must be a number > 0, got 0"),
    ("zoo epochs negative", [*ZOO, "--epochs", "-2"], r"argument --epochs: must be a number > 0, got -2"),
    ("zoo epochs nan", [*ZOO, "--epochs", "nan"], r"argument --epochs: must be a finite number, got nan"),
    ("zoo width zero", [*ZOO, "--width", "0"], r"argument --width: must be an int >= 1, got 0"),
    ("zoo bad architecture", ["zoo", "train", "R0", "--out", OUT], r"blocks='R0' is not an architecture name"),
    ("threads zero", [*PRESET, "--threads", "0"], r"argument --threads: must be an int >= 1, got 0"),
    ("threads negative", [*PRESET, "--threads", "-1"], r"argument --threads: must be an int >= 1, got -1"),
    ("input size one int", ["layers", "R1111", "--input-size", "3"], r"argument --input-size: expected 3 arguments"),
    ("input size zero", ["layers", "R1111", "--input-size", "3", "0", "32"], r"--input-size: must be an int >= 1"),
    ("layers num-classes zero", ["layers", "R1111", "--num-classes", "0"], r"--num-classes: must be an int >= 1"),
    ("measures unknown", [*PRESET, "--measures", "bogus"], r"--measures: 'bogus' names 'bogus', which is not a"),
    ("measures repeated", [*PRESET, "--measures", "cka,cka"], r"--measures: 'cka,cka' names measure 'cka' more than"),
    ("measures empty", [*PRESET, "--measures", ","], r"--measures: ',' is empty: name at least one measure"),
    ("batch size zero", [*PRESET, "--batch-size", "0"], r"argument --batch-size: must be an int >= 1, got 0"),
    ("patience zero", [*PRESET, "--patience", "0"], r"argument --patience: must be an int >= 1, got 0"),
    ("study epochs zero", [*PRESET, "--epochs", "0"], r"argument --epochs: must be a number > 0, got 0"),
    ("study epochs inf", [*PRESET, "--epochs", "inf"], r"argument --epochs: must be a finite number, got inf"),
    ("study width zero", [*PRESET, "--width", "0"], r"argument --width: must be an int >= 1, got 0"),
    ("limit zero", [*PRESET, "--limit", "0"], r"argument --limit: must be an int >= 1, got 0"),
    ("seed not an int", [*PRESET, "--seed", "1.5"], rf"argument --seed: {SEEDS}, got '1.5'"),
    ("seed too large", [*PRESET, "--seed", str(2**70)], rf"argument --seed: {SEEDS}, got {2**70}"),
    ("seed negative", [*PRESET, "--seed", "-1"], rf"argument --seed: {SEEDS}, got -1"),
    ("min-delta one", [*PRESET, "--patience", "1", "--min-delta", "1"], r"--min-delta: must be a number in \[0, 1\)"),
    ("min-delta negative", [*PRESET, "--min-delta", "-0.1"], r"--min-delta: must be a number in \[0, 1\), got -0.1"),
    ("min-delta without patience", [*PRESET, "--min-delta", "0.01"], r"min_delta=0.01 only applies with patience"),
    ("memory budget negative", [*PRESET, "--memory-budget", "-1"], r"--memory-budget: must be a number >= 0, got -1"),
    ("memory budget nan", [*PRESET, "--memory-budget", "nan"], r"--memory-budget: must be a finite number, got nan"),
    ("precision unknown", [*PRESET, "--precision", "fp64"], r"argument --precision: invalid choice: 'fp64'"),
    ("out empty", ["study", "run", "--out", ""], r"argument --out: must be a path, got ''"),
    ("config with a preset flag", ["study", "run", "--config", CONFIG, "--epochs", "2", "--out", OUT],
     r"--epochs is an option of presets, which --config does not read"),
    ("config with seed 0", ["study", "run", "--config", CONFIG, "--seed", "0", "--out", OUT],
     r"--seed is an option of presets"),
    ("config with a bad key", ["study", "run", "--config", "{bad_config}", "--out", OUT],
     r"\[networks.B\] width must be an int >= 1, got 'eight'"),
    ("zoo digits with a data root", [*ZOO, "--data-root", "."], r"--data digits is bundled and reads no --data-root"),
    ("zoo digits with download", [*ZOO, "--download"], r"--data digits is bundled and reads no --download"),
    ("address without ray", [*PRESET, "--address", "auto"], r"--address auto is a Ray cluster's: add --executor ray"),
    ("compare digits with a data root", ["compare", "R1111", "R1111", "--data-root", ".", "--out", OUT],
     r"--data digits is bundled and reads no --data-root"),
    ("compare measure unknown", ["compare", "R1111", "R1111", "--measures", "stitch", "--out", OUT],
     r"--measures: 'stitch' names 'stitch', which is not a measure"),
    ("compare rule unknown", ["compare", "R1111", "R1111", "--rule", "max", "--out", OUT], r"--rule: invalid choice"),
    ("compare layers repeated", ["compare", "R1111", "R1111", "--layers-a", "stem,stem", "--out", OUT],
     r"--layers-a: 'stem,stem' names layer 'stem' more than once"),
    ("compare layers empty", ["compare", "R1111", "R1111", "--layers-b", ",", "--out", OUT],
     r"--layers-b: ',' is empty: name at least one layer"),
    ("compare num-classes zero", ["compare", "R1111", "R1111", "--num-classes", "0", "--out", OUT],
     r"--num-classes: must be an int >= 1, got 0"),
    ("analyze mse epochs zero", ["study", "analyze", OUT, "--mse-epochs", "0"], r"--mse-epochs: must be a number > 0"),
    ("analyze images both ways", ["study", "analyze", OUT, "--no-images", "--image-pair", "a", "b"],
     r"argument --image-pair: not allowed with argument --no-images"),
]  # fmt: skip


@pytest.fixture
def threads():
    """`cli.main` sets torch's thread count; give this test process its own back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("argv, message", [row[1:] for row in CLI_ROWS], ids=[row[0] for row in CLI_ROWS])
def test_a_bad_flag_exits_2_with_a_message_before_any_work(tmp_path, capsys, threads, argv, message):
    out = tmp_path / "run"
    config, bad_config = tmp_path / "study.toml", tmp_path / "bad.toml"
    config.write_text(_toml({}))
    bad_config.write_text(_toml({"networks.B": {"width": '"eight"'}}))
    argv = [a.format(out=out, config=config, bad_config=bad_config) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not out.exists()


# ---------------------------------------------------------------- study files

BASE: dict[str, dict[str, str]] = {  # TOML tables of raw values; "" is the top level
    "": {},
    "data": {"dataset": '"digits"', "limit": "64"},
    "recipe": {"epochs": "1", "batch_size": "32", "base_batch_size": "32"},
    "zoo_recipe": {"epochs": "1", "batch_size": "32", "base_batch_size": "32"},
    "networks.A": {"zoo": '"R1111"', "width": "4", "layers": '["stem", "layer4.0"]'},  # would train first
    "networks.B": {"zoo": '"R1111"', "width": "4"},
}


Changes = dict[str, "dict[str, str | None] | None"]


def _toml(changes: Changes) -> str:
    """`BASE` with some values changed (``None`` drops a key or a whole table), as TOML text."""
    tables = {name: dict(keys) for name, keys in BASE.items()}
    for name, keys in changes.items():
        if keys is None:
            tables.pop(name, None)
            continue
        table = tables.setdefault(name, {})
        for key, value in keys.items():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
    lines = [f"{key} = {value}" for key, value in tables.pop("").items()]
    for name, keys in tables.items():
        lines += [f"\n[{name}]", *(f"{key} = {value}" for key, value in keys.items())]
    return "\n".join(lines) + "\n"


B = "networks.B"
TOML_ROWS: list[tuple[str, Changes, str]] = [
    ("width a word", {B: {"width": '"eight"'}}, r"bad.toml: \[networks.B\] width must be an int >= 1, got 'eight'"),
    ("width zero", {B: {"width": "0"}}, r"\[networks.B\] width must be an int >= 1, got 0"),
    ("width a float", {B: {"width": "4.0"}}, r"\[networks.B\] width must be an int >= 1, got 4.0"),
    ("pairs a number", {"": {"pairs": "5"}}, r"pairs must be 'all' or a list of \[sender, receiver\] pairs .*got 5"),
    ("pairs another word", {"": {"pairs": '"cross"'}}, r"pairs must be 'all' or a list .*got 'cross'"),
    ("pairs empty", {"": {"pairs": "[]"}}, r"pairs is empty: use 'all' or list \[sender, receiver\] pairs"),
    ("pair of one", {"": {"pairs": '[["A"]]'}}, r"pairs\[0\] must be a \[sender, receiver\] pair .*got \['A'\]"),
    ("pair names no network", {"": {"pairs": '[["A", "C"]]'}}, r"pairs\[0\] names 'C', which is not a network"),
    ("pair of a missing control", {"": {"pairs": '[["A random", "B"]]'}}, r"names 'A random', which is not a"),
    ("pairs repeated", {"": {"pairs": '[["A", "B"], ["A", "B"]]'}}, r"pairs lists \['A', 'B'\] more than once"),
    ("seed a word", {"": {"seed": '"zero"'}}, rf"bad.toml: seed {SEEDS}, got 'zero'"),
    ("seed a float", {"": {"seed": "1.5"}}, r"seed must be an int .*got 1.5"),
    ("seed a bool", {"": {"seed": "true"}}, r"seed must be an int .*got True"),
    ("out empty", {"": {"out": '""'}}, r"out must be a non-empty string, got ''"),
    ("device a number", {"": {"device": "0"}}, r"device must be a non-empty string, got 0"),
    ("kind unknown", {"": {"kind": '"conv"'}}, r"kind must be one of 'auto', 'linear', .*got 'conv'"),
    ("init unknown", {"": {"init": '"zeros"'}}, r"init must be one of 'lstsq', 'random', 'identity', got 'zeros'"),
    ("lstsq with mlp", {"": {"init": '"lstsq"', "kind": '"mlp"'}}, r"init = 'lstsq' needs kind = 'linear' stitches"),
    ("layers one string", {B: {"layers": '"layer1.0"'}},
     r"\[networks.B\] layers must be a list of layer names such as .*got 'layer1.0'"),
    ("layers empty", {B: {"layers": "[]"}}, r"\[networks.B\] layers is empty: name at least one layer"),
    ("layers repeated", {B: {"layers": '["stem", "layer1.0", "stem"]'}},
     r"\[networks.B\] layers names layer 'stem' more than once"),
    ("layers not strings", {B: {"layers": "[1, 2]"}}, r"\[networks.B\] layers must be a list of layer names"),
    ("layer unknown", {B: {"layers": '["stem", "nope"]'}}, r"\[networks.B\] layers: .*has no layer 'nope'"),
    ("measures one string", {"": {"measures": '"cka"'}}, r"measures must be a list of measure names .*got 'cka'"),
    ("measures unknown", {"": {"measures": '["stitch", "ckaa"]'}}, r"measures names 'ckaa', which is not a measure"),
    ("measures empty", {"": {"measures": "[]"}}, r"measures is empty: name at least one measure"),
    ("measures repeated", {"": {"measures": '["cka", "cka"]'}}, r"measures names measure 'cka' more than once"),
    ("recipe epochs a string", {"recipe": {"epochs": '"4"'}}, r"\[recipe\] epochs must be a number, got '4'"),
    ("recipe epochs zero", {"recipe": {"epochs": "0"}}, r"\[recipe\] Recipe: epochs .*> 0"),
    ("recipe epochs inf", {"recipe": {"epochs": "inf"}}, r"\[recipe\] epochs must be a finite number, got inf"),
    ("recipe lr nan", {"recipe": {"lr": "nan"}}, r"\[recipe\] lr must be a finite number, got nan"),
    ("recipe batch size a float", {"recipe": {"batch_size": "32.0"}}, r"\[recipe\] batch_size must be an int, got 32.0"
     ),
    ("recipe batch size a bool", {"recipe": {"batch_size": "true"}}, r"\[recipe\] batch_size must be an int, got True"),
    ("recipe flag a string", {"recipe": {"nesterov": '"yes"'}}, r"\[recipe\] nesterov must be true or false, got 'yes'"
     ),
    ("recipe amp a number", {"recipe": {"amp": "1"}}, r"\[recipe\] amp must be true or false, got 1"),
    ("recipe unknown field", {"recipe": {"lrr": "1"}},
     r"a recipe table has a field Recipe does not know: \[recipe\] lrr; allowed: .*base_batch_size"),
    ("recipe seed", {"recipe": {"seed": "3"}}, r"\[recipe\] seed: the study's seed seeds every recipe"),
    ("recipe min_delta alone", {"recipe": {"min_delta": "0.01"}}, r"\[recipe\] Recipe: min_delta only applies with"),
    ("zoo recipe epochs a string", {"zoo_recipe": {"epochs": '"4"'}}, r"\[zoo_recipe\] epochs must be a number"),
    ("zoo recipe epochs zero", {"zoo_recipe": {"epochs": "0"}}, r"\[zoo_recipe\] Recipe: epochs .*> 0"),
    ("recipe not a table", {"": {"recipe": "5"}, "recipe": None}, r"bad.toml: recipe must be a table, got 5"),
    ("data limit zero", {"data": {"limit": "0"}}, r"\[data\] limit must be an int >= 1, got 0"),
    ("data limit a string", {"data": {"limit": '"64"'}}, r"\[data\] limit must be an int >= 1, got '64'"),
    ("data dataset unknown", {"data": {"dataset": '"mnist"'}}, r"\[data\] dataset must be one of 'digits', .*'mnist'"),
    ("data digits with root", {"data": {"root": '"."'}}, r"\[data\] dataset = 'digits' is bundled and reads no root"),
    ("data cifar without root", {"data": {"dataset": '"cifar10"'}}, r"\[data\] dataset = 'cifar10' needs root"),
    ("data root missing", {"data": {"dataset": '"folder"', "root": '"no/such/folder"'}},
     r"\[data\] root = 'no/such/folder' is not a folder"),
    ("data unknown key", {"data": {"size": "3"}}, r"\[data\] has unknown key\(s\) \['size'\]"),
    ("zoo bad architecture", {B: {"zoo": '"R0"'}}, r"\[networks.B\] zoo must be an architecture such as 'R1211'"),
    ("control a string", {B: {"control": '"yes"'}}, r"\[networks.B\] control must be true or false, got 'yes'"),
    ("two sources", {B: {"file": '"x.safetensors"'}}, r"\[networks.B\] has zoo and file; give one source"),
    ("no source", {B: {"zoo": None}}, r"\[networks.B\] needs one of zoo = ..., file = ..."),
    ("file missing", {B: {"zoo": None, "width": None, "file": '"no/such.safetensors"'}},
     r"\[networks.B\] file = 'no/such.safetensors' does not exist"),
    ("width of a file network", {B: {"zoo": None, "torchvision": '"resnet18"'}},
     r"\[networks.B\] width applies to zoo networks only, not torchvision"),
    ("num_classes of a zoo network", {B: {"num_classes": "10"}},
     r"\[networks.B\] num_classes applies to torchvision and timm networks only, not zoo"),
    ("num_classes zero", {B: {"zoo": None, "width": None, "torchvision": '"resnet18"', "num_classes": "0"}},
     r"\[networks.B\] num_classes must be an int >= 1, got 0"),
    ("torchvision unknown", {B: {"zoo": None, "width": None, "torchvision": '"resnet1888"'}},
     r"\[networks.B\] torchvision = 'resnet1888' is not a model name"),
    ("torchvision without layers", {B: {"zoo": None, "width": None, "torchvision": '"squeezenet1_1"'}},
     r"\[networks.B\] add layers = \[...\], the layers to stitch"),
    ("control named like a table", {"networks.A": {"control": "true"}, "networks.\"A random\"": {"zoo": '"R1111"'}},
     r"the control of \[networks.A\] is named 'A random', as is a \[networks\] table"),
    ("networks not a table", {"": {"networks": "5"}, "networks.A": None, B: None}, r"networks must be a table, got 5"),
]  # fmt: skip


@pytest.mark.parametrize("changes, message", [row[1:] for row in TOML_ROWS], ids=[row[0] for row in TOML_ROWS])
def test_a_bad_study_file_is_refused_before_any_work(tmp_path, changes, message):
    path = tmp_path / "bad.toml"
    path.write_text(_toml(changes))
    out = tmp_path / "run"
    with pytest.raises(StitchError, match=message):
        study_from_file(path, out=out, device="cpu", progress=False)
    assert not out.exists()  # no network trained (zoo networks are kept in out/networks), nothing written


def test_the_study_file_table_is_valid_as_it_stands(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(_toml({"": {"pairs": '[["A", "B"], ["B", "A"]]', "measures": '["stitch", "cka"]', "seed": "3"}}))
    study = study_from_file(path, out=tmp_path / "run", device="cpu", progress=False)
    assert study.pairs[:2] == [("A", "B"), ("B", "A")]
    assert study.measures == ("stitch", "cka")
    assert study.layers["A"] == ["stem", "layer4.0"]
    assert study.recipe.seed == 3


# ---------------------------------------------------------------- preset options from Python

OPTION_ROWS: list[tuple[str, dict[str, Any], str]] = [
    ("max_pairs negative", {"max_pairs": -1},
     r"PresetOptions: max_pairs must be an int >= 1, or None \(the preset's own\), got -1"),
    ("max_pairs zero", {"max_pairs": 0}, r"max_pairs must be an int >= 1.*got 0"),
    ("max_pairs a bool", {"max_pairs": True}, r"max_pairs must be an int >= 1.*got True"),
    ("epochs zero", {"epochs": 0}, r"PresetOptions: epochs must be a number > 0.*got 0"),
    ("epochs nan", {"epochs": float("nan")}, r"PresetOptions: epochs must be a finite number, got nan"),
    ("epochs a string", {"epochs": "4"}, r"PresetOptions: epochs must be a number > 0.*got '4'"),
    ("measures unknown", {"measures": ("stitch", "bogus")}, r"PresetOptions: measures names 'bogus', which is not"),
    ("measures one string", {"measures": "cka"}, r"PresetOptions: measures must be a list of measure names"),
    ("measures empty", {"measures": ()}, r"PresetOptions: measures is empty"),
    ("measures repeated", {"measures": ("stitch", "stitch")}, r"measures names measure 'stitch' more than once"),
    ("batch_size zero", {"batch_size": 0}, r"PresetOptions: batch_size must be an int >= 1.*got 0"),
    ("batch_size a float", {"batch_size": 2.5}, r"PresetOptions: batch_size must be an int >= 1.*got 2.5"),
    ("patience zero", {"patience": 0}, r"PresetOptions: patience must be an int >= 1.*got 0"),
    ("min_delta without patience", {"min_delta": 0.01}, r"min_delta=0.01 only applies with patience=N"),
    ("min_delta one", {"min_delta": 1.0, "patience": 1}, r"min_delta must be a number in \[0, 1\).*got 1.0"),
    ("width zero", {"width": 0}, r"PresetOptions: width must be an int >= 1.*got 0"),
    ("limit zero", {"limit": 0}, r"PresetOptions: limit must be an int >= 1.*got 0"),
    ("seed a string", {"seed": "zero"}, rf"PresetOptions: seed {SEEDS}, got 'zero'"),
    ("seed None", {"seed": None}, r"PresetOptions: seed must be an int .*got None"),
    ("precision unknown", {"precision": "fp64"}, r"precision must be one of 'fp32', 'bf16', 'fp16', or None"),
    ("init unknown", {"init": "zeros"}, r"PresetOptions: init must be one of 'lstsq', 'random', 'identity'"),
    ("memory_budget negative", {"memory_budget": -1}, r"PresetOptions: memory_budget must be an int >= 0.*got -1"),
    ("download a string", {"download": "yes"}, r"PresetOptions: download must be true or false, got 'yes'"),
    ("paper_recipe None", {"paper_recipe": None}, r"PresetOptions: paper_recipe must be true or false, got None"),
    ("data_root empty", {"data_root": ""}, r"PresetOptions: data_root must be a path.*got ''"),
]  # fmt: skip


@pytest.mark.parametrize("settings, message", [row[1:] for row in OPTION_ROWS], ids=[row[0] for row in OPTION_ROWS])
def test_a_bad_preset_option_is_refused_before_any_work(tmp_path, settings, message):
    with pytest.raises(StitchError, match=message):
        PresetOptions(**settings)
    out = tmp_path / "run"
    with pytest.raises(StitchError, match=message):
        run_preset("quick", out=out, device="cpu", progress=False, **{"limit": 32, "epochs": 0.25, **settings})
    assert not out.exists()


def test_valid_preset_options_are_kept_as_given():
    options = PresetOptions(data_root=Path("x"), seed=7, memory_budget=0, measures=["stitch", "cka"], epochs=1)
    assert (options.data_root, options.memory_budget, options.measures) == ("x", 0, ("stitch", "cka"))
    assert PresetOptions(**{f: getattr(options, f) for f in ("seed", "limit", "epochs", "measures")}).seed == 7
    assert ms.StitchError is StitchError
