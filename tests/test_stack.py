"""The stack's process handling on its own, with stand-in servers: what `stylepipe stack`
and its restart do when a service will not start (the topology tests run the real ones)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from stylepipe.ops import services as service_tools
from stylepipe.ops import stack as stack_tools

# A stand-in for a server: exits with code 3 on its first start (a crash while starting),
# serves /health on the next, and prints its database URL's password state on start.
STAND_IN = textwrap.dedent("""
    import http.server, os, sys
    marker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "started-once")
    print("database:", sys.argv[2], flush=True)
    if not os.path.exists(marker):
        open(marker, "w").close()
        sys.exit(3)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
""")


def _recorded_stack(folder: Path, script: Path, *extra: str) -> stack_tools.Stack:
    """A stack.json as `stack up` leaves it, with one 'mlflow' service (a stand-in) recorded."""
    port = service_tools.free_port()
    db = "postgresql://stylepipe:s3cret@127.0.0.1:5432/sp_mlflow"
    stack = stack_tools.Stack(folder=str(folder), optuna_url=db, mlflow_db_url=db, prefect_db_url=db)
    command = [sys.executable, str(script), str(port), db, *extra]
    stack.services.append(service_tools.Service("mlflow", 999_999_999, command, str(folder / "x.log"),
                                                f"http://127.0.0.1:{port}"))  # fmt: skip
    stack_tools.save(stack)
    return stack


def test_a_service_that_exits_while_starting_is_named_with_its_exit_code(tmp_path):
    stack = stack_tools.Stack(folder=str(tmp_path), optuna_url="", mlflow_db_url="", prefect_db_url="")
    service = stack_tools.start_service(stack, "mlflow", [sys.executable, "-c", "import sys; sys.exit(3)"], {},
                                 "http://127.0.0.1:9")  # fmt: skip
    with pytest.raises(service_tools.StackError, match=r"mlflow exited while starting \(exit code 3\)"):
        service_tools.wait_healthy(service, service.url + "/health", timeout=30)


def test_restart_starts_again_a_service_that_exits_while_starting_and_gives_it_its_password(tmp_path, capsys):
    script = tmp_path / "server.py"
    script.write_text(STAND_IN)
    _recorded_stack(tmp_path, script)
    assert "s3cret" not in (tmp_path / "stack.json").read_text()  # masked on disk

    new = stack_tools.restart(tmp_path, "mlflow", admin_url="postgresql://postgres:s3cret@127.0.0.1:5432/x")
    try:
        assert service_tools.is_running(new)
        assert (
            "mlflow exited while starting (exit code 3); starting it again (2/3)" in capsys.readouterr().err
        )
        log = Path(new.log).read_text()
        assert log.count("database: postgresql://stylepipe:s3cret@") == 2, log
        recorded = stack_tools.load(tmp_path)
        assert [s.pid for s in recorded.services] == [new.pid]  # the failed start is not recorded
        assert "s3cret" not in (tmp_path / "stack.json").read_text()
    finally:
        stack_tools.down(tmp_path)
    assert not service_tools.is_running(new)


def test_restart_gives_up_after_its_attempts_and_says_how_the_last_one_ended(tmp_path):
    script = tmp_path / "server.py"
    script.write_text("import sys; sys.exit(4)")
    _recorded_stack(tmp_path, script)
    with pytest.raises(service_tools.StackError, match=r"exited while starting \(exit code 4\)"):
        stack_tools.restart(tmp_path, "mlflow", attempts=2)
    assert len(stack_tools.load(tmp_path).services) == 1  # the last try stays recorded for `down`


def test_the_health_probe_tells_an_answer_from_none_and_keeps_the_password_out():
    import http.server
    import threading

    from stylepipe.stores import http_problem

    class Locked(http.server.BaseHTTPRequestHandler):  # a server behind basic auth
        def do_GET(self):
            self.send_response(200 if self.path == "/open" else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Locked)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert http_problem(f"{base}/open") == ""
        assert http_problem(f"{base}/health") == "HTTP 401"
        assert http_problem(f"{base}/health", any_status=True) == ""  # it answers: it is there
    finally:
        server.shutdown()
        server.server_close()
    closed = service_tools.free_port()
    problem = http_problem(f"http://me:s3cret@127.0.0.1:{closed}/health", timeout=5)
    assert problem and "s3cret" not in problem
