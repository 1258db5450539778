"""The realign demo's traffic: chats until stopped, and no new chat while paused."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from featurewatch.platform.apps.realign_demo import Traffic


def chat_server():
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append((time.time(), body["messages"][0]["content"]))
            answer = json.dumps({"system_fingerprint": "v1"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received


def wait_until(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_traffic_pauses_and_resumes():
    server, received = chat_server()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    traffic = Traffic(url, ["a", "b", "c"], concurrency=2, max_tokens=4)
    said = []
    try:
        traffic.start()
        assert traffic.wait_for("v1", 3, timeout_s=30) >= 3
        assert traffic.wait_for("v2", 1, timeout_s=0.5) == 0  # nobody answers as v2
        later = time.time() + 60
        assert traffic.wait_for("v1", 1, timeout_s=0.5, since=later) == 0
        assert wait_until(lambda: len(received) > 5)
        assert {p for _, p in received} == {"a", "b", "c"}
        with traffic.paused(said.append):
            time.sleep(0.2)  # the chats in flight finish
            paused_at = time.time()
            time.sleep(1.0)
            during = [t for t, _ in received if t > paused_at]
        resumed_at = time.time()
        resumed = wait_until(lambda: sum(t > resumed_at for t, _ in received) > 5)
    finally:
        traffic.close()
        server.shutdown()
    # Unpaused, the workers send dozens a second; a loaded machine may let each worker
    # that had passed the pause check before it was set send its one chat late.
    assert len(during) <= traffic.concurrency, during
    assert resumed
    assert said == ["traffic paused while the fine-tune trains", "traffic resumed"]
    assert traffic.failed == 0 and {v for _, v in traffic.answers} == {"v1"}
