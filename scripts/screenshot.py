#!/usr/bin/env python3
"""Screenshot a UI-format workflow in the real ComfyUI frontend through headless Chromium (DevTools
protocol over a loopback WebSocket; aiohttp only). Used by scripts/screenshot.sh; not run in CI.

  screenshot.py --server http://127.0.0.1:PORT --chromium /usr/bin/chromium WORKFLOW OUT.png [--size 1600x900]
"""
import argparse
import asyncio
import base64
import json
import shutil
import subprocess
import tempfile

import aiohttp


async def cdp(ws, counter, method, params=None):
    counter[0] += 1
    mid = counter[0]
    await ws.send_json({"id": mid, "method": method, "params": params or {}})
    while True:
        msg = await asyncio.wait_for(ws.receive_json(), timeout=60)
        if msg.get("id") == mid:
            if "error" in msg:
                raise RuntimeError(f"{method}: {msg['error']}")
            return msg.get("result", {})


async def js(ws, counter, expr):
    res = await cdp(ws, counter, "Runtime.evaluate", {"expression": expr, "awaitPromise": True, "returnByValue": True})
    if "exceptionDetails" in res:
        raise RuntimeError(f"JS error: {res['exceptionDetails']}")
    return res.get("result", {}).get("value")


async def shoot(a, port):
    w, h = (int(v) for v in a.size.split("x"))
    async with aiohttp.ClientSession() as s:
        for _ in range(100):  # bounded: DevTools endpoint up
            try:
                async with s.get(f"http://127.0.0.1:{port}/json/list") as r:
                    pages = [p for p in await r.json() if p["type"] == "page"]
                    if pages:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        else:
            raise SystemExit("chromium did not start")
        async with s.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            n = [0]
            await cdp(ws, n, "Emulation.setDeviceMetricsOverride", {"width": w, "height": h, "deviceScaleFactor": 1,
                                                                    "mobile": False})
            await cdp(ws, n, "Page.enable")
            await cdp(ws, n, "Page.navigate", {"url": a.server})
            for _ in range(120):  # bounded: the app and the node definitions loaded
                if await js(ws, n, "!!(window.app && window.app.graph && window.LiteGraph "
                                   "&& LiteGraph.registered_node_types['DualCFGSampler'])"):
                    break
                await asyncio.sleep(0.5)
            else:
                raise SystemExit("the frontend did not load our nodes")
            wf = json.load(open(a.workflow))
            await js(ws, n, f"window.app.loadGraphData({json.dumps(wf)})")
            await asyncio.sleep(2)
            # close any dialog (first-run tips, missing models) and fit the graph to the window
            await js(ws, n, "document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close')"
                            ".forEach(b => b.click()); true")
            await js(ws, n, "window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
            # hide banners and toasts over the canvas
            await js(ws, n, "document.querySelectorAll('[class*=banner], [class*=Banner], .p-toast')"
                            ".forEach(e => e.style.display = 'none'); true")
            await asyncio.sleep(2)
            shot = await cdp(ws, n, "Page.captureScreenshot", {"format": "png"})
            with open(a.out, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
            print("screenshot ->", a.out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workflow")
    ap.add_argument("out")
    ap.add_argument("--server", required=True)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--size", default="1600x900")
    ap.add_argument("--debug-port", type=int, default=9333)
    a = ap.parse_args()
    profile = tempfile.mkdtemp(prefix="shot-profile-")
    proc = subprocess.Popen([a.chromium, "--headless", "--no-sandbox", "--disable-gpu",
                             "--disable-background-networking",
                             "--disable-component-update", "--disable-sync", "--no-first-run",
                             f"--remote-debugging-port={a.debug_port}", "--remote-debugging-address=127.0.0.1",
                             f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(asyncio.wait_for(shoot(a, a.debug_port), timeout=180))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
