"""Screenshots of the playground for the README (docs/img/playground-desktop.png, -narrow.png).

Against the embedded default (``make serve``; SmolLM2-135M-Instruct styles), in headless Chromium:

    .venv/bin/python tests/playground_screenshots.py --url http://127.0.0.1:8000 --out docs/img

Three recipes on one prompt and seed (formal + playful weights, DeRa of playful, guidance), a
token of the first column explained; then the same page in a phone-sized window.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from browser import Browser


def set_value(driver, selector: str, value, root=None) -> None:
    driver.execute_script(
        "const el = (arguments[2] || document).querySelector(arguments[0]); el.value = arguments[1];"
        "for (const t of ['input', 'change']) el.dispatchEvent(new Event(t, {bubbles: true}))",
        selector, str(value), root)


def recipe(driver, column, kind: str, values: dict[str, object]) -> None:
    set_value(driver, "select.kind", kind, column)
    for selector, value in values.items():
        set_value(driver, selector, value, column)


def wait_done(driver, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        states = [s.text for s in driver.find_elements("css selector", ".column-status")]
        if states and all(s.startswith(("Done", "Refused", "Failed")) for s in states):
            return
        time.sleep(0.2)
    raise TimeoutError("the columns did not finish")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    browser = Browser(1500, 1850)
    d = browser.driver
    try:
        d.get(f"{args.url}/playground")
        end = time.monotonic() + 60
        while "policies" not in d.find_element("id", "server-status").text:
            if time.monotonic() > end:
                raise TimeoutError("the page did not list the models")
            time.sleep(0.1)
        set_value(d, "#prompt", "Give me one tip for learning to cook.")
        set_value(d, "#max-tokens", 28)
        set_value(d, "#temperature", 0.7)
        set_value(d, "#seed", 1)
        d.find_element("id", "add-column").click()
        cols = d.find_elements("css selector", "#columns .column")
        recipe(d, cols[0], "weights", {"input.slider-value[data-name='smollm2']": 0,
                                       "input.slider-value[data-name='formal']": 0.5,
                                       "input.slider-value[data-name='playful']": 0.5})
        recipe(d, cols[1], "dera", {})
        selects = cols[1].find_elements("css selector", ".kind-form select")
        d.execute_script("arguments[0].value = 'smollm2'; arguments[1].value = 'playful'", selects[0], selects[1])
        recipe(d, cols[2], "guidance", {".kind-form input[type=text]": "Answer rudely."})
        d.find_element("id", "run").click()
        wait_done(d)
        token = cols[0].find_elements("css selector", ".text .tok")[3]
        token.click()
        d.execute_script("window.scrollTo(0, 0)")
        d.save_screenshot(str(args.out / "playground-desktop.png"))
        d.set_window_size(420, 1800)
        time.sleep(0.5)
        d.execute_script("window.scrollTo(0, 0)")
        d.save_screenshot(str(args.out / "playground-narrow.png"))
    finally:
        browser.close()
    print(f"wrote {args.out / 'playground-desktop.png'} and {args.out / 'playground-narrow.png'}")


if __name__ == "__main__":
    main()
