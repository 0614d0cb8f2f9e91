"""The command line's own parsing: a mistyped command, option or value ends in one line, as the
project's other user errors do, and names the help that lists what is accepted. Ctrl-C while a
command starts ends in click's one line too."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.commands import environment, run_cli_concurrently

USAGE_ERRORS = [
    (
        ["trian"],
        "error: No such command 'trian'. Did you mean 'train'? (see 'naics-embedder --help')",
    ),
    (["--foo"], "error: No such option '--foo' (see 'naics-embedder --help')"),
    (
        ["--debug=1"],
        "error: Option '--debug' does not take a value (see 'naics-embedder --help')",
    ),
    (["data", "--foo"], "error: No such option '--foo' (see 'naics-embedder data --help')"),
    (
        ["data", "build", "--debug"],
        "error: --debug goes before the command: naics-embedder --debug data build ...",
    ),
    (["train", "--foo"], "error: No such option '--foo' (see 'naics-embedder train --help')"),
    (
        ["train", "-c"],
        "error: Option '-c' requires an argument (see 'naics-embedder train --help')",
    ),
    (
        ["search", "a bakery"],
        "error: Missing option '--from-checkpoint' (see 'naics-embedder search --help')",
    ),
    (
        ["embed", "--from-checkpoint", "finetune"],
        "error: Invalid value for '--config': conf/config.yaml is not in this folder: run "
        "naics-embedder from the project's folder (the one holding conf/), or give --config PATH "
        "(see 'naics-embedder embed --help')",
    ),
    (
        ["data", "buidl"],
        "error: No such command 'buidl'. Did you mean 'build'? (see 'naics-embedder data --help')",
    ),
    (
        ["data", "build", "--raw-dir", "README.md"],
        "error: Invalid value for '--raw-dir': Directory 'README.md' is a file "
        "(see 'naics-embedder data build --help')",
    ),
]


def test_usage_errors_end_in_one_line_naming_the_help(tmp_path):
    (tmp_path / "README.md").write_text("a file, not a folder\n")
    results = run_cli_concurrently(tmp_path, [arguments for arguments, _ in USAGE_ERRORS])
    for (arguments, expected), result in zip(USAGE_ERRORS, results, strict=True):
        assert result.returncode == 2, (arguments, result.stderr)
        assert result.stderr == expected + "\n", arguments
        assert result.stdout == ""


def test_a_group_named_without_its_command_still_shows_its_help(tmp_path):
    [result] = run_cli_concurrently(tmp_path, [["data"]])
    assert result.stderr.startswith("Usage: naics-embedder data [OPTIONS] COMMAND")
    assert "build" in result.stderr


def test_ctrl_c_while_torch_imports_ends_in_one_line(tiny_workdir):
    """Interrupted between torch's first modules and the end of its import, which quiets its
    loggers, a command printed torch's FakeTensor cache statistics after click's line."""
    env = environment(tiny_workdir)
    env["PYTHONPROFILEIMPORTTIME"] = "1"  # a line on stderr as each module's import ends
    command = subprocess.Popen(
        [sys.executable, "-m", "naics_mlflow", "train", "--curriculum", "01_stage"],
        cwd=tiny_workdir,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in command.stderr:
        if line.rsplit("|", 1)[-1].strip() == "torch._subclasses.fake_tensor":
            command.send_signal(signal.SIGINT)
            break
    else:
        raise AssertionError("the command ended before importing torch._subclasses.fake_tensor")
    rest = command.stderr.read()
    assert command.wait(timeout=60) == 1
    printed = [line for line in rest.splitlines() if line and not line.startswith("import time:")]
    assert printed == ["Aborted!"]
