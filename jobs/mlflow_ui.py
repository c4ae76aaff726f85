"""Serve the MLflow UI over the local store (runs/mlflow) until Ctrl+C.

    python jobs/mlflow_ui.py [--port 5000]     then open http://127.0.0.1:5000

While it runs, jobs on this machine log through it instead of starting their own server.
With MLFLOW_TRACKING_URI set (a cluster server), open that address instead.
"""

import argparse
import time

from metaensemble.tracking import LocalTrackingServer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=5000)
    args = p.parse_args()
    server = LocalTrackingServer(port=args.port).start()
    server.record()
    print(f"MLflow UI: {server.url}  (store {server.store}); Ctrl+C to stop", flush=True)
    try:
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.unrecord()
        server.stop()


if __name__ == "__main__":
    main()
