"""Screenshots of the Ray dashboard's pages (Jobs, Serve, ...) taken with headless Chromium.

    python scripts/dashboard_screenshots.py [--url http://127.0.0.1:8265] [--out runs/screenshots]

Needs Debian's `chromium` binary (`apt-get install chromium`) or any Chrome given with --chromium. Only Chromium's
command line is used (`--headless --screenshot`), so no browser driver or Python package is needed.

Ray's token authentication: when the dashboard reports token mode, the pages are loaded through a small reverse
proxy on 127.0.0.1 that adds `Authorization: Bearer <token>` to every request (the token comes from
$RAY_AUTH_TOKEN or ~/.ray/auth_token). The browser itself never holds the token, and it never appears on a
command line.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

PAGES = {"jobs": "#/jobs", "serve": "#/serve", "overview": "#/overview", "metrics": "#/metrics",
         "cluster": "#/cluster", "actors": "#/actors"}
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Hop-by-hop headers are not forwarded by a proxy (RFC 9110 section 7.6.1).
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length"}


class ScreenshotError(Exception):
    """A problem the user can fix (no browser, dashboard unreachable, no token): one line, exit code 1."""


def find_browser(explicit: str | None) -> str:
    if explicit:
        if shutil.which(explicit) or Path(explicit).is_file():
            return shutil.which(explicit) or explicit
        raise ScreenshotError(f"--chromium {explicit}: no such executable")
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    raise ScreenshotError("needs a Chromium binary on PATH (Debian: `apt-get install chromium`, which provides "
                          f"/usr/bin/chromium), or --chromium PATH; looked for {', '.join(BROWSERS)}")


def auth_mode(base: str) -> str:
    """The dashboard's authentication mode ('token' or 'disabled'); raises when the dashboard is not reachable."""
    try:
        with urllib.request.urlopen(f"{base}/api/authentication_mode", timeout=10) as r:
            return json.loads(r.read())["authentication_mode"]
    except (urllib.error.URLError, OSError) as err:
        raise ScreenshotError(f"no Ray dashboard at {base} ({err}); start one with `ray start --head "
                              "--include-dashboard true --dashboard-host 127.0.0.1` or pass --url") from None
    except (KeyError, ValueError):
        return "disabled"  # an older dashboard without the endpoint has no token auth


def read_token() -> str:
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.is_file():
        token = path.read_text().strip()
    if not token:
        raise ScreenshotError(f"the dashboard uses token authentication, but neither $RAY_AUTH_TOKEN nor {path} "
                              "holds a token (`ray get-auth-token` prints the cluster's)")
    return token


def start_auth_proxy(base: str, token: str) -> http.server.ThreadingHTTPServer:
    """A reverse proxy on 127.0.0.1 (a free port) that forwards to `base` with the bearer token added."""
    target = urlsplit(base)

    class Forward(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Authorization"] = f"Bearer {token}"
            conn = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except OSError as err:
                self.send_error(502, f"dashboard unreachable: {err}")
                return
            finally:
                conn.close()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

        def log_message(self, *args) -> None:  # quiet: the summary table is the output
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def screenshot(browser: str, url: str, out: Path, size: str, budget_ms: int, timeout_s: float) -> float:
    """One PNG of `url`; returns seconds taken. The virtual-time budget lets the single-page app fetch and render."""
    with tempfile.TemporaryDirectory(prefix="scalestack-chromium-") as profile:
        cmd = [browser, "--headless", f"--screenshot={out}", f"--window-size={size}", "--no-sandbox",
               "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--hide-scrollbars",
               f"--virtual-time-budget={budget_ms}", f"--user-data-dir={profile}", url]
        t0 = time.perf_counter()
        out.unlink(missing_ok=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ScreenshotError(f"{browser} took over {timeout_s:.0f} s on {url}") from None
        if not out.is_file() or out.stat().st_size == 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ScreenshotError(f"{browser} exited {proc.returncode} without writing {out}: {' | '.join(tail)}")
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8265", help="Ray dashboard address.")
    ap.add_argument("--out", type=Path, default=Path("runs/screenshots"), help="Folder for the PNG files.")
    ap.add_argument("--pages", default="jobs,serve", help=f"Comma-separated, from: {', '.join(PAGES)}.")
    ap.add_argument("--window-size", default="1400,900", help="Browser window WIDTH,HEIGHT in pixels.")
    ap.add_argument("--budget-ms", type=int, default=15000,
                    help="Chromium's virtual-time budget per page (ms): time for the page to load its data.")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="Wall-clock limit per page (s).")
    ap.add_argument("--chromium", help="Browser executable (default: the first of chromium, google-chrome on PATH).")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    proxy = None
    try:
        pages = [p.strip() for p in args.pages.split(",") if p.strip()]
        unknown = sorted(set(pages) - set(PAGES))
        if unknown:
            raise ScreenshotError(f"--pages: unknown page(s) {', '.join(unknown)}; choose from {', '.join(PAGES)}")
        browser = find_browser(args.chromium)
        base = args.url.rstrip("/")
        mode = auth_mode(base)
        served = base
        if mode == "token":
            proxy = start_auth_proxy(base, read_token())
            served = f"http://127.0.0.1:{proxy.server_address[1]}"
        args.out.mkdir(parents=True, exist_ok=True)
        table = Table("page", "address", "file", "KiB", "seconds",
                      title=f"Ray dashboard {base} (auth: {mode}) → {args.out}")
        for page in pages:
            out = args.out / f"ray-dashboard-{page}.png"
            with console.status(f"{page}: headless {Path(browser).name}, up to {args.budget_ms / 1000:.0f} s "
                                "of page time"):
                took = screenshot(browser, f"{served}/{PAGES[page]}", out, args.window_size, args.budget_ms,
                                  args.timeout_s)
            table.add_row(page, PAGES[page], out.name, f"{out.stat().st_size / 1024:,.0f}", f"{took:.1f}")
        Console(width=max(100, Console().width)).print(table)
        return 0
    except ScreenshotError as err:
        print(f"dashboard_screenshots: {err}", file=sys.stderr)
        return 1
    finally:
        if proxy is not None:
            proxy.shutdown()


if __name__ == "__main__":
    sys.exit(main())
