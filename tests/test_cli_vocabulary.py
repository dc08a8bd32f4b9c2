"""One option vocabulary: every command's --help lists its choices, an option shared by several
commands has one default, the library's defaults are the command line's, and README's command
table is what the commands themselves say (cli.app.synopsis)."""
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

import coopt_fast
from coopt_fast.cli.app import app, synopsis

COMMANDS = typer.main.get_command(app).commands
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

# Options whose default rightly depends on the command.
PER_COMMAND = {
    "--batch-size": "inference batches (extract) are not training batches",
    "--epochs": "a student or prior trains 10 epochs; the linear probe 100",
    "--out": "required, except demo's default folder",
    "--limit": "demo's D is sized for 2 CPU cores; elsewhere all samples",
    "--limit-train": "demo's probes are sized for 2 CPU cores; probe's default is the whole set",
    "--limit-test": "demo's probes are sized for 2 CPU cores; probe's default is the whole set",
    "--dim": "demo's target dim is sized for 2 CPU cores; align's is the paper's 512",
    "--wd": "pretrain's default depends on --method",
    "--arch": "pretrain builds this architecture; probe needs one only when the checkpoint does not record it",
}


def options(name: str) -> dict:
    return {max(p.opts, key=len): p for p in COMMANDS[name].params if p.param_type_name == "option" and p.name != "help"}


def test_an_option_shared_by_commands_has_one_default():
    seen: dict[str, dict] = {}
    for name in COMMANDS:
        for opt, p in options(name).items():
            seen.setdefault(opt, {})[name] = p.default
    assert seen["--device"] and set(seen["--device"].values()) == {"auto"}, seen["--device"]
    for opt, by_command in seen.items():
        if opt not in PER_COMMAND:
            assert len({repr(v) for v in by_command.values()}) == 1, f"{opt}: {by_command}"


def test_one_name_per_meaning():
    every = {opt: name for name in COMMANDS for p in COMMANDS[name].params for opt in p.opts}
    assert "--k" not in every and "--probe-train" not in every and "--probe-test" not in every
    for name in COMMANDS:  # -k is always K, the number of participants
        for p in COMMANDS[name].params:
            if "-k" in p.opts:
                assert "--participants" in p.opts, name
            if "--out" in p.opts:
                assert "-o" in p.opts, name
        opts = options(name)
        assert "--json" in opts, f"{name}: every command can print its summary as JSON"
        limits = [o for o in opts if "limit" in o]
        assert all(re.fullmatch(r"--limit(-train|-test)?", o) for o in limits), (name, limits)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_lists_every_choice_and_no_type_tag_on_flags(name):
    r = CliRunner().invoke(app, [name, "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    text = re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", r.output))
    for opt, p in options(name).items():
        d = p.type_descriptor
        if d.is_choice:
            assert "|".join(map(str, d.choices)) in text, f"{name} {opt}: choices not listed"
        if p.is_flag:
            assert not re.search(re.escape(opt) + r"\b[^│\n]*<bool>", r.output), f"{name} {opt}: <bool> tag"


# CLI parameter -> (library parameter, how the CLI's value maps to the library's)
RENAMED = {"quiet": ("progress", lambda v: not v), "no_plot": ("plot", lambda v: not v), "round_": ("round", None),
           "store_on_device": ("store_on_device", {"auto": None, "yes": True, "no": False}.get)}
CLI_ONLY = {"json_out", "sizes"}  # output format; --sizes is a comma list that split receives parsed
LIBRARY = {"split": "split", "extract": "extract", "score": "score", "align": "align", "merge": "merge",
           "inspect": "inspect", "verify": "verify", "status": "status", "probe": "probe"}
CONFIGS = {"train": coopt_fast.TrainConfig, "pretrain": coopt_fast.PretrainConfig, "demo": coopt_fast.DemoConfig}


def _library_defaults(name: str) -> dict:
    out = {}
    if name in CONFIGS:
        out.update({f.name: f.default for f in dataclasses.fields(CONFIGS[name])
                    if f.default is not dataclasses.MISSING})
    if name == "probe":
        out.update({f.name: f.default for f in dataclasses.fields(coopt_fast.ProbeConfig)})
    fn = getattr(coopt_fast, LIBRARY.get(name, name))
    out.update({k: v.default for k, v in inspect.signature(fn).parameters.items() if v.default is not inspect.Parameter.empty})
    return out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_library_defaults_are_the_command_lines(name):
    lib = _library_defaults(name)
    for p in COMMANDS[name].params:
        if p.param_type_name != "option" or p.name in CLI_ONLY or p.name == "help" or p.required:
            continue
        key, conv = RENAMED.get(p.name, (p.name, None))
        assert key in lib, f"{name}: --{p.name} has no library parameter {key!r}"
        cli_default = conv(p.default) if conv else p.default
        assert cli_default == lib[key], f"{name} {max(p.opts, key=len)}: CLI {p.default!r}, library {lib[key]!r}"


def test_readme_command_table_is_what_the_commands_say():
    rows = {m.group(1).split()[1]: m.group(1).replace("\\|", "|")
            for m in re.finditer(r"^\| `(coopt-fast [a-z]+[^`]*)` \|", README, re.M)}
    assert set(rows) == set(COMMANDS), set(rows) ^ set(COMMANDS)
    for name in COMMANDS:
        assert rows[name] == synopsis(name), f"README row for {name} should read:\n{synopsis(name)}"


def test_public_functions_document_parameters_returns_and_raises():
    for name in coopt_fast.__all__:
        fn = getattr(coopt_fast, name)
        if not inspect.isfunction(fn):
            continue
        doc = inspect.getdoc(fn) or ""
        for section in ("Args:", "Returns:", "Raises:"):
            assert section in doc, f"coopt_fast.{name}: docstring has no {section}"
        for param in inspect.signature(fn).parameters.values():
            if param.kind is param.VAR_KEYWORD:
                assert "**" + param.name in doc or param.name in doc, f"coopt_fast.{name}: **{param.name} undocumented"
            else:
                assert re.search(rf"^\s+{param.name}:", doc, re.M), f"coopt_fast.{name}: {param.name} undocumented"
