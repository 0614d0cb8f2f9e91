"""The command line's own parsing: a mistyped command, option or value ends in one line, as the
project's other user errors do, and names the help that lists what is accepted. Ctrl-C while a
command starts ends in click's one line too, and the command ends by the signal. A command pays
for no more than it uses: no garbage collection over its imports at exit, no MLflow for a
checkpoint file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

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
    command = _interrupted_while_torch_imports(
        [sys.executable, "-m", "naics_mlflow", "train", "--curriculum", "01_stage"], tiny_workdir
    )
    rest = command.stderr.read()
    assert command.wait(timeout=60) == -signal.SIGINT
    printed = [line for line in rest.splitlines() if line and not line.startswith("import time:")]
    assert printed == ["Aborted!"]


def test_ctrl_c_stops_a_shell_loop_of_commands(tiny_workdir):
    """bash starts a loop's next command after one that exits, whatever its status, and stops
    the loop only when the command ended by the signal, as Python does on an uncaught Ctrl-C."""
    command = f"{Path(sys.executable).parent / 'naics-embedder'} train --curriculum 01_stage"
    loop = _interrupted_while_torch_imports(
        ["bash", "-c", f"for stage in 1 2; do {command}; echo next; done"], tiny_workdir
    )
    loop.stderr.read()
    assert loop.wait(timeout=120) == -signal.SIGINT
    assert loop.stdout.read() == ""


def _interrupted_while_torch_imports(args: list[str], workdir: Path) -> subprocess.Popen:
    """``args`` started in a session of their own, sent Ctrl-C (SIGINT to the session, as a
    terminal sends it) once torch's import has begun, its stderr left to read."""
    env = environment(workdir)
    env["PYTHONPROFILEIMPORTTIME"] = "1"  # a line on stderr as each module's import ends
    command = subprocess.Popen(
        args,
        cwd=workdir,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in command.stderr:
        if line.rsplit("|", 1)[-1].strip() == "torch._subclasses.fake_tensor":
            os.killpg(command.pid, signal.SIGINT)
            return command
    raise AssertionError("the command ended before importing torch._subclasses.fake_tensor")


def test_a_command_keeps_what_it_imported_out_of_the_collections_at_exit(tmp_path):
    """Interpreter shutdown runs several full garbage collections, each 0.18 s over the 300,000
    or so objects that importing torch, transformers and MLflow makes. The command's last exit
    handler freezes them (``gc.freeze``) out of the collections' way."""
    script = (
        "import atexit, gc\n"
        "from naics_mlflow.cli import main\n"
        "try:\n"
        "    main(['runs'], prog_name='naics-embedder', standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "# Handlers run newest first: this one before the command's own.\n"
        "atexit.register(lambda: print('during', gc.get_freeze_count()))\n"
        "atexit._run_exitfuncs()\n"
        "print('after', gc.get_freeze_count())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        check=True,
    )
    counts = dict(line.split() for line in result.stdout.splitlines()[-2:])
    assert counts["during"] == "0"
    assert int(counts["after"]) > 100_000


def test_a_checkpoint_file_needs_no_mlflow_and_a_missing_one_is_refused_at_once(tiny_workdir):
    """Only a stage name or a URI needs the tracking store, and MLflow's import (about 1 s)."""
    checkpoint = tiny_workdir / "model.ckpt"
    checkpoint.write_bytes(b"read later, by the command")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from naics_mlflow.references import resolve_checkpoint\n"
        f"print(resolve_checkpoint({str(checkpoint)!r}, Path('downloads')))\n"
        "print('mlflow' in sys.modules)\n"
    )
    resolved = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert resolved.stdout.splitlines() == [
        f"ResolvedCheckpoint(path={checkpoint!r}, run_id=None)",
        "False",
    ]
    search = ["search", "a bakery", "--from-checkpoint", "missing/model.ckpt"]
    refused = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "naics_mlflow", *search],
        cwd=tiny_workdir,
        env=environment(tiny_workdir),
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2
    *imports, message = refused.stderr.splitlines()
    assert message == "error: checkpoint file missing/model.ckpt does not exist"
    imported = {line.rpartition("|")[2].strip() for line in imports}
    assert not imported & {"torch", "mlflow"}
