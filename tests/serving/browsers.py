"""Real browsers for the page's tests, behind one small interface, and the moves a person makes
on the page (:class:`Page`).

- Chromium: Debian's ``chromium`` through its WebDriver, ``chromedriver`` (Debian's
  ``chromium-driver``), with Selenium.
- Firefox: Debian's ``firefox-esr`` through WebDriver BiDi, the protocol Firefox speaks itself
  on ``--remote-debugging-port``; Debian packages no ``geckodriver`` (what Selenium would need),
  so a few lines of JSON over a WebSocket drive it here.

``scripts/browser.sh install`` installs both (apt).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "browser.sh"
BROWSERS = ("chromium", "firefox")


def browser_paths() -> dict[str, str]:
    """``{"chromium", "chromedriver", "firefox"}``: the programs, installed when missing (as
    root, with apt; elsewhere the caller skips)."""
    proc = subprocess.run([str(SCRIPT), "paths"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        if os.geteuid() != 0:
            raise PermissionError("installing the browsers (scripts/browser.sh install) needs root")
        install = subprocess.run(
            [str(SCRIPT), "install"], capture_output=True, text=True, timeout=900
        )
        assert install.returncode == 0, f"browser.sh install:\n{install.stdout}{install.stderr}"
        proc = subprocess.run([str(SCRIPT), "paths"], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
    return dict(zip(("chromium", "chromedriver", "firefox"), proc.stdout.split(), strict=True))


class Chromium:
    """Headless Chromium driven by Selenium through Debian's chromedriver."""

    name = "chromium"

    def __init__(self, paths: dict[str, str], downloads: Path, size: tuple[int, int]) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = paths["chromium"]
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            f"--window-size={size[0]},{size[1]}",
            "--force-device-scale-factor=1",
        ):
            options.add_argument(flag)  # fmt: skip
        options.add_experimental_option(
            "prefs",
            {"download.default_directory": str(downloads), "download.prompt_for_download": False},
        )
        self.driver = webdriver.Chrome(service=Service(paths["chromedriver"]), options=options)

    def get(self, url: str) -> None:
        self.driver.get(url)

    def run(self, script: str, *args):
        """Run ``script`` (a function body: ``arguments``, ``return``) in the page."""
        return self.driver.execute_script(script, *args)

    def pointer(self, *moves: tuple[str, float, float]) -> None:
        """Pointer moves in window CSS px: ``("move" | "down" | "up", x, y)``."""
        from selenium.webdriver.common.actions.action_builder import ActionBuilder

        actions = ActionBuilder(self.driver)
        for kind, x, y in moves:
            actions.pointer_action.move_to_location(round(x), round(y))
            if kind == "down":
                actions.pointer_action.pointer_down()
            elif kind == "up":
                actions.pointer_action.pointer_up()
        actions.perform()

    def press(self, *keys: str, held: str | None = None) -> None:
        """Type ``keys`` one after the other, ``held`` (a modifier) down the while."""
        from selenium.webdriver.common.action_chains import ActionChains

        chain = ActionChains(self.driver)
        if held:
            chain.key_down(held)
        for key in keys:
            chain.send_keys(key)
        if held:
            chain.key_up(held)
        chain.perform()

    def set_files(self, element_id: str, path: Path) -> None:
        self.driver.find_element("id", element_id).send_keys(str(path))

    def set_size(self, width: int, height: int) -> None:
        self.driver.set_window_size(width, height)

    def screenshot(self, path: Path) -> None:
        self.driver.save_screenshot(str(path))

    def close(self) -> None:
        self.driver.quit()


class Firefox:
    """Headless Firefox ESR over WebDriver BiDi (JSON commands on a WebSocket)."""

    name = "firefox"

    def __init__(self, paths: dict[str, str], downloads: Path, size: tuple[int, int]) -> None:
        import websocket

        self.profile = Path(tempfile.mkdtemp(prefix="seqops-firefox-"))
        prefs = {
            "browser.download.dir": str(downloads),
            "browser.download.folderList": 2,  # downloads go to browser.download.dir
            "browser.download.useDownloadDir": True,
            "browser.download.always_ask_before_handling_new_types": False,
            "browser.helperApps.neverAsk.saveToDisk": "text/csv,application/json",
            "browser.download.alwaysOpenPanel": False,
        }
        (self.profile / "user.js").write_text(
            "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in prefs.items())
        )
        port = free_port()
        self.log = (self.profile / "firefox.log").open("wb")
        self.proc = subprocess.Popen(
            [paths["firefox"], "--headless", "--no-remote", "--profile", str(self.profile),
             "--remote-debugging-port", str(port), "--width", str(size[0]),
             "--height", str(size[1]), "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        stop_at = time.monotonic() + 60
        while True:
            try:  # Firefox refuses WebSocket handshakes that carry an Origin header
                self.ws = websocket.create_connection(
                    f"ws://127.0.0.1:{port}/session", timeout=60, suppress_origin=True
                )
                break
            except (OSError, websocket.WebSocketException):
                if time.monotonic() > stop_at or self.proc.poll() is not None:
                    raise AssertionError(f"Firefox did not start: {self.output()}") from None
                time.sleep(0.2)
        self._id = 0
        self.command("session.new", capabilities={})
        tree = self.command("browsingContext.getTree")
        self.context = tree["contexts"][0]["context"]
        self.set_size(*size)

    def output(self) -> str:
        return (self.profile / "firefox.log").read_text(errors="replace")[-3000:]

    def command(self, method: str, **params):
        """Send one command and return its result (events on the way are dropped)."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") != self._id:
                continue
            if message.get("type") == "error":
                raise AssertionError(f"{method}: {message.get('error')}: {message.get('message')}")
            return message["result"]

    def get(self, url: str) -> None:
        self.command("browsingContext.navigate", context=self.context, url=url, wait="complete")

    def run(self, script: str, *args):
        result = self.command(
            "script.callFunction",
            functionDeclaration=f"function() {{ {script} }}",
            arguments=[_to_bidi(a) for a in args],
            awaitPromise=False,
            target={"context": self.context},
            serializationOptions={"maxObjectDepth": 8},
        )
        if result["type"] == "exception":
            raise AssertionError(f"page script failed: {result['exceptionDetails']['text']}")
        return _from_bidi(result["result"])

    def _actions(self, source: dict) -> None:
        self.command("input.performActions", context=self.context, actions=[source])

    def pointer(self, *moves: tuple[str, float, float]) -> None:
        steps = []
        for kind, x, y in moves:
            steps.append(
                {"type": "pointerMove", "x": round(x), "y": round(y), "origin": "viewport"}
            )
            if kind in ("down", "up"):
                steps.append({"type": f"pointer{kind.title()}", "button": 0})
        self._actions(
            {"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
             "actions": steps}
        )  # fmt: skip

    def press(self, *keys: str, held: str | None = None) -> None:
        steps = [{"type": "keyDown", "value": held}] if held else []
        for key in keys:
            steps += [{"type": "keyDown", "value": key}, {"type": "keyUp", "value": key}]
        if held:
            steps.append({"type": "keyUp", "value": held})
        self._actions({"type": "key", "id": "keyboard", "actions": steps})

    def set_files(self, element_id: str, path: Path) -> None:
        found = self.command(
            "script.evaluate",
            expression=f"document.getElementById({json.dumps(element_id)})",
            awaitPromise=False,
            target={"context": self.context},
        )
        element = {"sharedId": found["result"]["sharedId"]}
        self.command("input.setFiles", context=self.context, element=element, files=[str(path)])

    def set_size(self, width: int, height: int) -> None:
        viewport = {"width": width, "height": height}
        self.command("browsingContext.setViewport", context=self.context, viewport=viewport)

    def screenshot(self, path: Path) -> None:
        shot = self.command("browsingContext.captureScreenshot", context=self.context)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.command("session.end")
        with contextlib.suppress(Exception):
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


def _to_bidi(value) -> dict:
    """A Python value as a BiDi LocalValue (what a script's arguments are sent as)."""
    if value is None:
        return {"type": "null"}
    if isinstance(value, bool):
        return {"type": "boolean", "value": value}
    if isinstance(value, int | float):
        return {"type": "number", "value": value}
    if isinstance(value, str):
        return {"type": "string", "value": value}
    if isinstance(value, list | tuple):
        return {"type": "array", "value": [_to_bidi(v) for v in value]}
    if isinstance(value, dict):
        return {"type": "object", "value": [[k, _to_bidi(v)] for k, v in value.items()]}
    raise TypeError(f"cannot send {type(value).__name__} to the page")


def _from_bidi(remote: dict):
    """A BiDi RemoteValue as a Python value (numbers, strings, lists, dicts)."""
    kind = remote["type"]
    if kind in ("undefined", "null"):
        return None
    if kind == "number":
        value = remote["value"]
        return float(value) if isinstance(value, str) and value != "-0" else value
    if kind in ("string", "boolean"):
        return remote["value"]
    if kind == "array":
        return [_from_bidi(v) for v in remote.get("value", [])]
    if kind == "object":
        return {
            k if isinstance(k, str) else _from_bidi(k): _from_bidi(v) for k, v in remote["value"]
        }
    return remote  # a node or another handle, as the protocol gave it


def open_browser(name: str, paths: dict[str, str], downloads: Path, size: tuple[int, int]):
    """A started browser of ``name`` (one of :data:`BROWSERS`)."""
    return {"chromium": Chromium, "firefox": Firefox}[name](paths, downloads, size)


class Page:
    """The counting page in one browser, with the moves a person makes."""

    def __init__(self, browser, base: str) -> None:
        self.browser = browser
        self.base = base

    def js(self, script: str, *args):
        return self.browser.run(script, *args)

    def wait(self, condition, timeout: float = 30.0, what: str = "condition"):
        stop_at = time.monotonic() + timeout
        while time.monotonic() < stop_at:
            value = condition()
            if value:
                return value
            time.sleep(0.02)
        status = self.js("return document.getElementById('status').textContent")
        raise AssertionError(f"timed out waiting for {what}; the page says: {status}")

    def load(self) -> None:
        self.browser.get(self.base + "/")

    def open(self) -> None:
        self.load()
        self.wait(lambda: self.js("return document.body.dataset.ready === 'true'"), what="/info")

    def drop(self, data: bytes, name: str, mime: str = "image/png") -> None:
        """Drop a file on the image area, as a drag from the desktop does."""
        self.js(
            """const [b64, name, type] = arguments;
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], name, {type}));
            document.getElementById('view').dispatchEvent(
              new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));""",
            base64.b64encode(data).decode(), name, mime,
        )  # fmt: skip

    def paste(self, data: bytes, mime: str = "image/png") -> None:
        """Paste an image, as Ctrl+V does with a copied picture."""
        self.js(
            """const [b64, type] = arguments;
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], "image.png", {type}));
            const init = {clipboardData: data, bubbles: true, cancelable: true};
            document.dispatchEvent(new ClipboardEvent('paste', init));""",
            base64.b64encode(data).decode(), mime,
        )  # fmt: skip

    def state(self) -> str:
        return self.js("return document.body.dataset.state")

    def settled(self, count: int, timeout: float = 30.0) -> list[list[float]]:
        """Wait until a count has finished with ``count`` points; the points."""

        def done():
            return self.state() == "done" and self.js("return seqops.points.length") == count

        self.wait(done, timeout, f"a finished count of {count}")
        return self.points()

    def points(self) -> list[list[float]]:
        return self.js("return seqops.points.map((p) => [p.x, p.y])")

    def screen_of(self, x: float, y: float) -> tuple[float, float]:
        """Where image pixel (x, y) is in the window (CSS px)."""
        return tuple(
            self.js(
                """const r = document.getElementById('view').getBoundingClientRect();
                const v = seqops.view;
                const [x, y] = arguments;
                return [r.left + x * v.scale + v.x, r.top + y * v.scale + v.y];""",
                x, y,
            )
        )  # fmt: skip

    def click_image(self, x: float, y: float) -> None:
        sx, sy = self.screen_of(x, y)
        self.browser.pointer(("move", sx, sy), ("down", sx, sy), ("up", sx, sy))

    def drag_image(self, start: tuple[float, float], end: tuple[float, float]) -> None:
        (x1, y1), (x2, y2) = self.screen_of(*start), self.screen_of(*end)
        middle = ((x1 + x2) / 2, (y1 + y2) / 2)
        self.browser.pointer(("down", x1, y1), ("move", *middle), ("up", x2, y2))

    def click(self, element_id: str) -> None:
        """A real click in the middle of the element."""
        x, y = self.js(
            """const r = document.getElementById(arguments[0]).getBoundingClientRect();
            return [r.left + r.width / 2, r.top + r.height / 2];""",
            element_id,
        )
        self.browser.pointer(("move", x, y), ("down", x, y), ("up", x, y))

    def shown(self, element_id: str) -> bool:
        return self.js("return document.getElementById(arguments[0]).offsetParent !== null",
                       element_id)  # fmt: skip

    def focused(self) -> str:
        return self.js("return document.activeElement.id")

    def keys(self, *keys: str) -> None:
        self.browser.press(*keys)

    def chord(self, modifier: str, key: str) -> None:
        """``key`` with ``modifier`` held (``Keys.CONTROL``, ``Keys.SHIFT``)."""
        self.browser.press(key, held=modifier)

    def mark_centres(self) -> list[tuple[float, float]]:
        """The drawn marks' centres on screen, in order."""
        return self.js(
            """return [...document.querySelectorAll('#marks circle')].map((c) => {
                const r = c.getBoundingClientRect();
                return [r.left + r.width / 2, r.top + r.height / 2];
            });"""
        )
