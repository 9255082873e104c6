"""Rule files: parsing, round-trips, every selector field, and the errors a person can act on."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from surgeon.errors import RuleError
from surgeon.graph.blocks import ConvBlock
from surgeon.graph.rules import Selector, builtin_rule_names, load_rule, parse_overrides, parse_rule, parse_selector
from surgeon.modules import builtin_replacements

REGISTRY = builtin_replacements()


def block(**fields) -> ConvBlock:
    base = dict(
        path="model.4.cv1", type="Conv", conv="model.4.cv1.conv", norm="model.4.cv1.bn", act="model.4.cv1.act",
        act_type="SiLU", layer=4, region="backbone", source="graph", in_channels=64, out_channels=32, kernel=(1, 1),
        stride=(1, 1), groups=1, dilation=(1, 1), bias=False, params=2112,
    )
    return ConvBlock(**{**base, **fields})


# (selector YAML, block fields, expected match)
SELECTOR_CASES = [
    ({"region": "backbone"}, {}, True),
    ({"region": ["neck", "head"]}, {}, False),
    ({"region": "head"}, {"region": None}, False),
    ({"layers": 4}, {}, True),
    ({"layers": "5-9"}, {}, False),
    ({"layers": ["0-3", "4-4"]}, {}, True),
    ({"layers": 4}, {"layer": None}, False),
    ({"path": "model.4.*"}, {}, True),
    ({"path": "model.4.cv1.conv"}, {}, True),
    ({"path": "model.1?.*"}, {}, False),
    ({"path": r"re:model\.[0-9]\.cv1"}, {}, True),
    ({"path": r"re:model\.[0-9]"}, {}, False),  # a regex must match the whole path
    ({"type": "Conv"}, {}, True),
    ({"type": ["DWConv", "Conv2d"]}, {}, False),
    ({"kernel": 1}, {}, True),
    ({"kernel": [3, 5]}, {}, False),
    ({"kernel": 1}, {"kernel": (1, 3)}, False),
    ({"stride": 2}, {}, False),
    ({"stride": [1, 2]}, {}, True),
    ({"groups": 1}, {}, True),
    ({"groups": 1}, {"groups": 32, "in_channels": 32}, False),
    ({"depthwise": True}, {"groups": 32, "in_channels": 32}, True),
    ({"depthwise": True}, {}, False),
    ({"depthwise": False}, {}, True),
    ({"in_channels": {"min": 64}}, {}, True),
    ({"in_channels": {"min": 65}}, {}, False),
    ({"in_channels": 64}, {}, True),
    ({"out_channels": {"max": 31}}, {}, False),
    ({"out_channels": {"min": 16, "max": 32}}, {}, True),
    ({"act": "SiLU"}, {}, True),
    ({"act": "none"}, {"act": None, "act_type": None}, True),
    ({"act": "ReLU"}, {}, False),
    ({"region": "backbone", "kernel": 3}, {}, False),  # fields combine with AND
    ({}, {}, True),
]


@pytest.mark.parametrize(("fields", "overrides", "expected"), SELECTOR_CASES)
def test_selector_fields(fields, overrides, expected):
    assert parse_selector(fields, "test").matches(block(**overrides)) is expected


BAD_SELECTORS = [
    ({"region": "body"}, "region"),
    ({"kernel": "3"}, "kernel"),
    ({"kernel": -1}, "kernel"),
    ({"kernel": True}, "kernel"),
    ({"layers": "9-2"}, "layers"),
    ({"layers": "a-b"}, "layers"),
    ({"path": "re:("}, "path"),
    ({"in_channels": {"min": 9, "max": 2}}, "in_channels"),
    ({"in_channels": {"lo": 1}}, "in_channels"),
    ({"depthwise": "yes"}, "depthwise"),
    ({"kernal": 3}, "kernal"),
    ([1, 2], "select"),
]


@pytest.mark.parametrize(("fields", "named"), BAD_SELECTORS)
def test_bad_selector_names_the_field(fields, named):
    with pytest.raises(RuleError, match=named):
        parse_selector(fields, "rules/x.yaml: select")


def rule_data(**changes):
    data = {
        "name": "t",
        "description": "test rule",
        "select": {"region": ["neck", "head"], "kernel": 1},
        "exclude": [{"path": "model.2*"}],
        "replace": {"with": "plain_conv", "args": {"init": "copy"}},
    }
    data.update(changes)
    return data


BAD_RULES = [
    (rule_data(colour="red"), "colour"),
    ({k: v for k, v in rule_data().items() if k != "replace"}, "replace"),
    ({k: v for k, v in rule_data().items() if k != "select"}, "select"),
    (rule_data(name="two words"), "name"),
    (rule_data(replace={"with": "nonexistent"}), "nonexistent"),
    (rule_data(replace={"with": "plain_conv", "args": {"experts": 4}}), "experts"),
    (rule_data(replace={"with": "plain_conv", "why": 1}), "why"),
    (rule_data(replace="plain_conv"), "replace"),
    (rule_data(exclude={"path": "x"}), "exclude"),
    ("just text", "mapping"),
]


@pytest.mark.parametrize(("data", "named"), BAD_RULES)
def test_bad_rule_names_file_and_field(data, named, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RuleError, match=named) as info:
        load_rule(str(path), REGISTRY)
    assert str(path) in str(info.value)


def test_unparsable_and_missing_rule_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(RuleError, match="not valid YAML"):
        load_rule(str(broken), REGISTRY)
    with pytest.raises(RuleError, match="no rule named 'no_such_rule'"):
        load_rule("no_such_rule", REGISTRY)
    with pytest.raises(RuleError, match="no such rule file"):
        load_rule(str(tmp_path / "absent.yaml"), REGISTRY)


def test_round_trip(tmp_path):
    rule = parse_rule(rule_data(), "inline", REGISTRY)
    path = tmp_path / "t.yaml"
    path.write_text(rule.dump())
    again = load_rule(str(path), REGISTRY)
    assert again == rule
    assert parse_rule(yaml.safe_load(again.dump()), "again", REGISTRY) == rule


@pytest.mark.parametrize("name", builtin_rule_names())
def test_builtin_rules_parse_and_round_trip(name):
    rule = load_rule(name, REGISTRY)
    assert rule.name == name, "a built-in rule's name must equal its file name"
    assert rule.description and "\n" not in rule.description
    assert parse_rule(yaml.safe_load(rule.dump()), "dump", REGISTRY) == rule


def test_user_rule_by_path_equals_builtin_by_name(tmp_path):
    name = builtin_rule_names()[0]
    copy = tmp_path / "mine.yaml"
    copy.write_text(load_rule(name, REGISTRY).dump())
    assert load_rule(str(copy), REGISTRY) == load_rule(name, REGISTRY)


def test_exclude_removes_blocks():
    rule = parse_rule(rule_data(select={"kernel": 1}), "inline", REGISTRY)
    assert rule.selects(block(path="model.4.cv1", conv="model.4.cv1.conv"))
    assert not rule.selects(block(path="model.22.cv1", conv="model.22.cv1.conv"))


def test_untrainable_blocks_are_never_selected():
    rule = parse_rule(rule_data(select={}, exclude=[]), "inline", REGISTRY)
    assert rule.selects(block())
    assert not rule.selects(block(trainable=False))


def test_overrides():
    assert parse_overrides(["init=random", "dyn.experts=8", "x.ratio=0.5"]) == {
        None: {"init": "random"}, "dyn": {"experts": 8}, "x": {"ratio": 0.5}}
    with pytest.raises(RuleError, match="key=value"):
        parse_overrides(["experts"])
    rule = parse_rule(rule_data(), "inline", REGISTRY)
    assert rule.with_args({"init": "random"}, REGISTRY).action.kwargs == {"init": "random"}
    with pytest.raises(RuleError, match="no argument 'bogus'"):
        rule.with_args({"bogus": 1}, REGISTRY)


def test_selector_dataclass_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Selector().kernel = (1,)


def test_builtin_rules_are_package_data():
    """Read through importlib.resources from inside the package, so a wheel install has them."""
    from pathlib import Path

    import surgeon
    from surgeon.graph.rules import builtin_rules_dir

    assert builtin_rules_dir().parent == Path(surgeon.__file__).parent
    expected = {"dyn_head", "dyn_all", "dyn_neck3x3", "condconv_head", "dw_backbone", "dwsep_all", "ds4_all",
                "ds8_head", "cot_neck", "plain_head"}
    assert set(builtin_rule_names()) == expected


def test_cli_rules_lists_every_rule_and_replacement():
    from click.testing import CliRunner

    from surgeon.cli import main

    result = CliRunner().invoke(main, ["rules"])

    assert result.exit_code == 0, result.output
    for name in builtin_rule_names():
        assert name in result.output
    for entry in builtin_replacements():
        assert entry.name in result.output
    assert "insert" in result.output and "cot_attention" in result.output


def test_cli_rules_show_insert_rule_lists_the_layers_it_selects(checkpoint_factory):
    from click.testing import CliRunner

    from surgeon.api import inspect_model
    from surgeon.cli import main
    from surgeon.graph.match import match_rules

    model = checkpoint_factory("yolov8n.yaml")
    result = CliRunner().invoke(main, ["rules", "show", "cot_neck", "--model", model, "--imgsz", "64"])

    assert result.exit_code == 0, result.output
    inspection = inspect_model(model, imgsz=64)
    expected = match_rules(inspection.blocks, [load_rule("cot_neck", builtin_replacements())],
                           layers=inspection.layers)
    assert len(expected) == 2  # the neck layers feeding P4 and P5
    assert f"# 2 of {len(inspection.layers)} layers" in result.output
    for match in expected:
        assert f"{match.target.path}  region=neck" in result.output


def test_regular_expressions_from_rule_files_match_in_linear_time(tmp_path):
    """``(a+)+$`` backtracks exponentially in Python's engine (about 19 s for one 30-character path); selectors are
    compiled by RE2, whose matching is linear in the text. Constructs RE2 does not have are refused in one line,
    naming the rule file."""
    from surgeon.graph.rules import _path_matches, _regex

    assert type(_regex("(a+)+$")).__module__.startswith("re2")
    assert not _path_matches("re:(a+)+$", block(path="a" * 40 + "b", conv="a" * 40 + "b.conv"))
    assert _path_matches(r"re:model\.4\.cv.", block())
    path = tmp_path / "backref.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "select": {"path": r"re:(a)\1"}, "replace": {"with": "dwconv"}}))
    with pytest.raises(RuleError, match=r"backref.yaml: .*bad regular expression .*RE2: invalid escape sequence"):
        load_rule(str(path), REGISTRY)


@pytest.mark.parametrize("setting, message", [
    ("experts=abc", "--set for rule 'dyn_head': dynamic_conv's experts takes a number (default 4), not 'abc'"),
    ("dyn_head.init=7", "--set for rule 'dyn_head': dynamic_conv's init takes a word (default 'upcycle'), not 7"),
    ("bogus=1", "--set for rule 'dyn_head': dynamic_conv has no argument 'bogus' (arguments: experts,"),
])
def test_a_wrong_set_names_the_rule_the_argument_and_why(setting, message, checkpoint_factory, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("surgeon")
    run = subprocess.run([str(script), "apply", checkpoint_factory("yolov8n.yaml"), "-r", "dyn_head", "--set", setting,
                          "--dry-run", "--imgsz", "64"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    (line,) = run.stderr.strip().splitlines()
    assert run.returncode != 0 and line.startswith(f"error: {message}"), run.stderr
    assert ".yaml" not in line  # the user's --set, not the built-in rule's file, is what is wrong


def test_rule_files_get_the_same_argument_checks(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nselect: {kernel: 1}\nreplace: {with: dynamic_conv, args: {experts: four}}\n")
    with pytest.raises(RuleError, match="r.yaml: replace.args: dynamic_conv's experts takes a number"):
        load_rule(path, builtin_replacements())
