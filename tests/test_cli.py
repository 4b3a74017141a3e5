"""The ``nettransplant`` console script: its commands, their help, flags and config names.

Every command answers ``--help`` with exit 0 and lists every flag with its default;
flags are spelled with underscores only; ``--config`` takes a packaged config by name;
an unknown command, flag or config name is one ``error:`` line, exit 2; no default
writes into the installed package.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

import nettransplant
from nettransplant import commands
from nettransplant.commands import pretrain, reproduce
from nettransplant.experiments import config as config_checks
from nettransplant.net import commands as net_commands

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(nettransplant.__file__).resolve().parent
WITH_CONFIG = {"reproduce", "growth", "jacobian", "pretrain", "fit-probe"}
FLAG_LINE = re.compile(r"^  --(\[no\])?(\w+)")
DEFAULT_LINE = re.compile(r"^      \((default: .+|required)\)$")


def _help(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def _listed_flags(text: str) -> list[str]:
    lines = text.splitlines()
    names = [m.group(2) for m in map(FLAG_LINE.match, lines) if m]
    defaults = [line for line in lines if DEFAULT_LINE.match(line)]
    assert len(defaults) == len(names), text  # every flag shows its default (or required)
    return names


def test_the_script_lists_every_command_and_exits_0(capsys):
    assert commands.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in commands.COMMANDS:
        assert re.search(rf"^  {re.escape(name)} ", out, re.M), (name, out)


@pytest.mark.parametrize("argv, needle", [(["bogus"], "unknown command 'bogus'"),
                                          ([], "no command"),
                                          (["net", "bogus"], "unknown command 'bogus'")])
def test_an_unknown_command_is_one_line_and_exit_2(capsys, argv, needle):
    with pytest.raises(SystemExit) as stop:
        commands.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert needle in err


@pytest.mark.parametrize("name", sorted(set(commands.COMMANDS) - {"net"}))
def test_every_command_helps_with_every_flag_and_its_default(name, capsys):
    module = importlib.import_module(commands.COMMANDS[name][0])
    out = _help(module.main, [], capsys)
    assert out.startswith(f"usage: nettransplant {name} [flags]")
    names = _listed_flags(out)
    assert ("config" in names) == (name in WITH_CONFIG), names
    assert all("-" not in flag for flag in names), names
    if name in WITH_CONFIG:
        assert re.search(r"^      \(default: '\w+'\)$", out.split("--config:")[1], re.M)


@pytest.mark.parametrize("command", sorted(net_commands.COMMANDS))
def test_every_net_command_helps_with_its_flags(command, capsys):
    assert net_commands.main(["--help"]) == 0
    assert f"  {command} " in capsys.readouterr().out
    out = _help(net_commands.main, [command], capsys)
    assert out.startswith(f"usage: nettransplant net {command} [flags]")
    assert all("-" not in flag for flag in _listed_flags(out))


def test_a_hyphenated_flag_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        net_commands.main(["export", "--net", "n", "--task-module", "t", "--out", "o"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: Unknown command line flag 'task-module'")


def test_a_config_name_is_the_packaged_file_and_a_path_is_a_file():
    assert config_checks.config_file("silhouettes:quick") == \
        f"{PACKAGE / 'configs' / 'silhouettes.py'}:quick"
    assert config_checks.config_file("voc_vgg16") == str(PACKAGE / "configs" / "voc_vgg16.py")
    assert config_checks.config_file("my/own.py:x") == "my/own.py:x"
    assert config_checks.packaged_configs() == ["jacobian_matching", "net_growth",
                                                "silhouettes", "voc_vgg16"]
    with pytest.raises(ValueError, match="no packaged config 'bogus'; packaged configs: "
                                         "jacobian_matching, net_growth"):
        config_checks.config_file("bogus:quick")


def test_the_config_by_name_equals_the_config_by_path(tmp_path):
    by_name = reproduce.parse(["--config", "silhouettes:quick", "--config.seed=3"]).config
    by_path = reproduce.parse([f"--config={PACKAGE}/configs/silhouettes.py:quick",
                               "--config.seed=3"]).config
    assert by_name.seed == 3 and by_name.to_dict() == by_path.to_dict()
    default = config_checks.load_config_file(f"{PACKAGE}/configs/silhouettes.py")
    assert reproduce.parse([]).config.to_dict() == default.to_dict()


@pytest.mark.parametrize("argv, needle", [
    (["--config", "bogus"], "error: --config bogus: no packaged config 'bogus'"),
    (["--config=silhouettes:fast"], "error: --config silhouettes:fast: unknown variant"),
    (["--config", "absent.py"], "error: --config absent.py: no config file absent.py"),
    (["--config.nonexistent=1"], "error: --config.nonexistent: config has no field"),
    (["--workdir"], "error: "),
    (["extra"], "error: unexpected arguments ['extra']"),
])
def test_a_bad_config_or_flag_is_one_line_and_exit_2(argv, needle, capsys, tmp_path,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        reproduce.parse(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith(needle), err


def test_no_default_writes_into_the_package(tmp_path):
    defines = {name: importlib.import_module(module).define_flags
               for name, (module, _) in commands.COMMANDS.items() if name != "net"}
    defines.update({f"net {name}": command.define
                    for name, command in net_commands.COMMANDS.items()})
    for name, define in defines.items():
        values = flags.FlagValues()
        define(values)
        for flag in (values[n] for n in values):
            if isinstance(flag.default, str):
                assert not Path(flag.default).is_absolute(), (name, flag.name)
                assert "nettransplant/" not in flag.default, (name, flag.name)
    values = pretrain.parse(["--workdir", str(tmp_path / "w")])
    assert values.output_dir is None  # main writes to <workdir>/backbone


def test_python_dash_m_nettransplant_is_the_same_script():
    result = subprocess.run([sys.executable, "-m", "nettransplant", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0 and result.stdout.startswith("usage: nettransplant <command>")
