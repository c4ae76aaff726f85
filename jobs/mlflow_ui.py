"""Serve the MLflow UI over the local store (runs/mlflow) until Ctrl+C.

    python jobs/mlflow_ui.py [--port 5000]     then open http://127.0.0.1:5000

While it runs, jobs on this machine log through it instead of starting their own server.
With MLFLOW_TRACKING_URI set (a cluster server), open that address instead.

MLflow 3's UI opens every experiment in the view its sidebar switch ("GenAI" / "Model
training") holds: a per-browser setting in the page's localStorage, "GenAI" (trace
overview, token usage) until the user switches; no experiment tag or server option
changes it. So the UI is served on ``--port`` through a small front that passes every
request through to the store's ``mlflow server`` unchanged and, in the HTML page, makes
"Model training" (the runs table) the default for a browser that has not chosen yet, and
opens an experiment's runs table in the platform's saved view (its key metrics as columns,
``tracking.runs.TAG_VIEW``) the first time this browser visits that experiment; MLflow's
banner then offers "Override saved view" to keep those columns, or "Exit shared view".
"""

import _library  # noqa: F401  # isort: skip - this checkout's library first (jobs/_library.py)
import argparse
import http.client
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from metaensemble.tracking import LocalTrackingServer
from metaensemble.tracking.runs import TAG_VIEW, VIEW_KEY

# MLflow's UI keeps the switch as useLocalStorage({key: "mlflow.workflowType", version: 1}).
WORKFLOW_KEY = "mlflow.workflowType_v1"
TRAINING_VIEW = b"".join([
    b"<script>try{if(localStorage.getItem('", WORKFLOW_KEY.encode(), b"')===null)",
    b"localStorage.setItem('", WORKFLOW_KEY.encode(), b"','\"machine_learning\"')}catch(e){}</script>",
])
# On an experiment's page with no state in its address (#/experiments/<id> or .../runs),
# visited for the first time by this browser, and only if the experiment has the saved
# view: the same page with ?viewStateShareKey=<key> (MLflow's own share link).
SAVED_VIEW = ("""<script>(function(){
var seen='metaensemble.savedViewOpened.';
function open(){var h=location.hash,m=h.match(/^#\\/experiments\\/([0-9]+)(\\/runs)?\\/?$/);
if(!m)return;try{if(localStorage.getItem(seen+m[1]))return}catch(e){return}
fetch('/ajax-api/2.0/mlflow/experiments/get?experiment_id='+m[1]).then(function(r){return r.json()})
.then(function(d){var t=(d.experiment&&d.experiment.tags)||[];
if(!t.some(function(x){return x.key==='@TAG@'})||location.hash!==h)return;
localStorage.setItem(seen+m[1],'1');
location.replace('#/experiments/'+m[1]+'/runs?viewStateShareKey=@KEY@')}).catch(function(){})}
window.addEventListener('hashchange',open);open()})();</script>""").replace("@TAG@", TAG_VIEW).replace(
    "@KEY@", VIEW_KEY).encode()
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
              "upgrade", "content-length", "host", "accept-encoding"}
CHUNK = 1 << 16


def front(upstream: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1:``port`` that forwards to ``upstream`` (the mlflow server)."""
    target = urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: bodies end when it closes

        def _body(self) -> bytes | None:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                parts = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(parts)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else None

        def _forward(self) -> None:
            body = self._body()
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=300)
            try:
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                except OSError as e:
                    self.send_error(502, f"mlflow server {upstream} did not answer: {e}")
                    return
                html = (resp.getheader("Content-Type") or "").startswith("text/html")
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                if html:  # the app's page: small, read whole to add the default view
                    page = resp.read().replace(b"<head>", b"<head>" + TRAINING_VIEW + SAVED_VIEW, 1)
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                if resp.getheader("Content-Length") is not None:
                    self.send_header("Content-Length", resp.getheader("Content-Length"))
                self.end_headers()
                while self.command != "HEAD" and (chunk := resp.read1(CHUNK)):
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the browser went away
            finally:
                conn.close()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _forward

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


def _stop(*_) -> None:
    raise KeyboardInterrupt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=5000)
    args = p.parse_args()
    # Ctrl+C and `kill` both stop the mlflow server too (also when started in the
    # background, where SIGINT comes ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop)
    server = LocalTrackingServer()
    ui = front(server.url, args.port)  # bind first: a taken port fails before any server starts
    serving = threading.Thread(target=ui.serve_forever, daemon=True)
    try:
        server.start()
        server.record()
        serving.start()
        print(f"MLflow UI: http://127.0.0.1:{args.port}  (store {server.store}, server {server.url}); "
              "Ctrl+C to stop", flush=True)
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        if serving.is_alive():
            ui.shutdown()
        ui.server_close()
        server.unrecord()
        server.stop()


if __name__ == "__main__":
    main()
