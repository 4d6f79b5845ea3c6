"""embedpipe.local.stack's start-up with every process, port and health check stubbed. (Health checks and port choice
against real sockets: tests/integration/test_stack.py.)"""

from __future__ import annotations

from embedpipe.local import stack


def test_up_that_fails_part_way_stops_what_it_started(tmp_path, monkeypatch):
    from embedpipe.config import Settings

    settings = Settings.from_env({"EMBEDPIPE_STATE_DIR": str(tmp_path)})
    # (up points os.environ at the emulators: tests/conftest.py gives the environment back after each test)
    started, stopped = [], {}
    monkeypatch.setattr(stack, "_pid", lambda s, name: None)
    monkeypatch.setattr(stack, "prepare_bqemulator", lambda: None)
    monkeypatch.setattr(stack, "BQ_EXE", tmp_path)  # installed (an existing path)
    monkeypatch.setattr(stack, "pubsub_emulator", lambda: "cloud-pubsub-emulator")  # no `gcloud info` to find it
    monkeypatch.setattr(stack, "start_part", lambda s, p: started.append(p.name) or 1000 + len(started))

    def health(s, p, timeout=90.0):
        if p.name == "milvus":
            raise stack.StackError("milvus exited during start-up")

    monkeypatch.setattr(stack, "wait_healthy", health)
    monkeypatch.setattr(stack, "_stop", lambda s, pids, echo=None, timeout=15.0: stopped.update(pids))
    try:
        stack.up(settings, echo=lambda *_: None, components=False)
    except stack.StackError:
        pass
    else:
        raise AssertionError("up should have failed")
    assert started == ["pubsub", "milvus", "bigquery"]
    assert stopped == {"pubsub": 1001, "milvus": 1002, "bigquery": 1003}
