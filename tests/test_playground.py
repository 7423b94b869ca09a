"""The browser playground (GET /playground) in a real headless Chromium against a live server.

The native engine on the tiny fixture models behind uvicorn, with an API key (the page must send
it). Every number the page shows is checked against what the API answers for the same request,
asked independently with httpx: the streamed text, the compiled weights, each policy's logprob of a
hovered token and its weighted contribution, the mixed top-5, the guard's 403 message, the best-of
candidates. The page must request nothing from any host but the server, and pass axe-core
(vendored in tests/vendor/axe-core) at WCAG 2.1 AA.

Without Chromium the browser tests skip with the reason; with POLICYMIX_REQUIRE_BROWSER=1 (CI)
they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from api_helpers import LiveServer, fake_config
from browser import AXE, Browser, event_stream_urls, hosts, missing, requested_urls
from fake_engine import FakeEngine
from policymix.api import build_app
from policymix.api.auth import hash_key
from policymix.config import ApiKeySpec

KEY = "playground-key"
PROMPT = "The quick brown fox"


# --------------------------------------------------------------------------- without a browser


def test_page_and_assets_are_served_with_a_same_origin_policy():
    with TestClient(build_app(FakeEngine(), fake_config(guard={"max_abs_weight": 3.0}), env={})) as c:
        page = c.get("/playground")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
        # every asset the page names is served, with its type
        for asset in re.findall(r'(?:href|src)="(playground/[^"]+)"', page.text):
            r = c.get(f"/{asset}")
            assert r.status_code == 200, asset
            assert r.headers["content-type"].split(";")[0] in ("text/css", "text/javascript"), asset
        app_js = c.get("/playground/app.js").text
        for module in re.findall(r'from "\./([^"]+)"', app_js):
            assert c.get(f"/playground/{module}").status_code == 200, module
        assert c.get("/playground/settings.json").json() == {
            "guard": {"max_abs_weight": 3.0, "max_sum_abs_weight": 16.0}, "keys_required": False}
        missing_file = c.get("/playground/nothing.js")
        assert missing_file.status_code == 404 and missing_file.json()["error"]["code"] == "not_found"
        assert c.get("/playground/..%2Fconfig.py").status_code == 404


def test_playground_false_turns_the_page_off():
    with TestClient(build_app(FakeEngine(), fake_config(playground=False), env={})) as c:
        for path in ("/playground", "/playground/app.js", "/playground/settings.json"):
            r = c.get(path)
            assert r.status_code == 404, path
            assert r.json()["error"]["code"] == "not_found"
        assert c.get("/v1/models").status_code == 200  # the API is unchanged
    with TestClient(build_app(FakeEngine(), fake_config(), env={})) as c:
        assert "/playground" not in c.get("/openapi.json").json()["paths"]  # not part of the API document


# ------------------------------------------------------------------------------- in the browser


@pytest.fixture(scope="module")
def server(tiny_registry, tiny_config):
    from policymix.engine.native import NativeEngine

    cfg = tiny_config.model_copy(deep=True)
    cfg.server.api_keys = [ApiKeySpec(key_sha256=hash_key(KEY), name="playground")]  # may not invert `safe`
    with LiveServer(build_app(NativeEngine(tiny_registry), cfg, env={})) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    reason = missing()
    if reason:
        if os.environ.get("POLICYMIX_REQUIRE_BROWSER") == "1":
            pytest.fail(f"POLICYMIX_REQUIRE_BROWSER=1 but {reason}")
        print(f"\nplayground browser tests skipped: {reason}")
        pytest.skip(reason)
    b = Browser()
    yield b
    b.close()


def api(server, endpoint: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{endpoint}", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"})


def wait(predicate, timeout: float = 90.0, what: str = "the page"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Page:
    """The playground as a user drives it: fields by label id, columns by position."""

    def __init__(self, browser: Browser, server: LiveServer):
        self.b, self.d, self.server = browser, browser.driver, server
        self.d.get(f"{server.url}/playground")
        wait(lambda: "API key" in self.status(), what="the key prompt")
        self.d.find_element("id", "api-key").send_keys(KEY + "\n")  # Enter submits the key form
        wait(lambda: "policies" in self.status(), what="the models")

    def status(self) -> str:
        return self.d.find_element("id", "server-status").text

    def set(self, field_id: str, value) -> None:
        el = self.d.find_element("id", field_id)
        if el.tag_name == "select":
            self.d.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'))",
                                  el, str(value))
        else:
            el.clear()
            el.send_keys(str(value))

    def columns(self):
        return self.d.find_elements("css selector", "#columns .column")

    def column(self, i: int):
        cols = self.columns()
        while len(cols) <= i:
            self.d.find_element("id", "add-column").click()
            cols = self.columns()
        return cols[i]

    def recipe(self, i: int, kind: str, **selects) -> None:
        col = self.column(i)
        kind_select = col.find_element("css selector", "select.kind")
        self.d.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'))",
                              kind_select, kind)
        for label, value in selects.items():  # a select by its label's text
            control = self.d.execute_script(
                "const l = [...arguments[0].querySelectorAll('label')].find(x => x.textContent === arguments[1]);"
                "return l && document.getElementById(l.htmlFor);", col, label)
            self.d.execute_script("arguments[0].value = arguments[1]", control, value)

    def weight(self, i: int, policy: str, value: float) -> None:
        box = self.column(i).find_element("css selector", f"input.slider-value[data-name='{policy}']")
        box.clear()
        box.send_keys(str(value))

    def slider(self, i: int, value: float) -> None:
        """The column's only unnamed slider (alpha, scale, beta')."""
        box = self.column(i).find_element("css selector", "input.slider-value[data-name='']")
        box.clear()
        box.send_keys(str(value))

    def keep_columns(self, n: int) -> None:
        while len(self.columns()) > n:
            self.columns()[-1].find_element("css selector", ".remove").click()

    def run(self, keyboard: bool = False) -> None:
        if keyboard:  # Ctrl+Enter in the prompt
            from selenium.webdriver.common.keys import Keys

            self.d.find_element("id", "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
        else:
            self.d.find_element("id", "run").click()
        wait(lambda: all(re.match(r"(Done|Refused|Failed)", c.find_element("css selector", ".column-status").text)
                         for c in self.columns()), what="every column to finish")

    def text(self, col) -> str:
        """The streamed text exactly (textContent: control characters and spaces kept)."""
        return self.d.execute_script(
            "return [...arguments[0].querySelectorAll('.text .tok:not(.end)')].map(b => b.textContent).join('')", col)

    def shown_weights(self, col) -> dict[str, float]:
        text = col.find_element("css selector", ".weights-values").text
        return {name: float(w) for name, w in (part.rsplit(" ", 1) for part in text.split(" · "))}

    def tables(self, root, cls: str) -> list[list[str]]:
        """A table's body rows as cell texts (row header first)."""
        return self.d.execute_script(
            "return [...arguments[0].querySelectorAll(`table.${arguments[1]} tbody tr`)]"
            ".map(r => [...r.children].map(c => c.textContent))", root, cls)


def snippet_body(curl: str) -> dict:
    quoted = curl.split(" -d ", 1)[1].strip()
    assert quoted[0] == quoted[-1] == "'"
    return json.loads(quoted[1:-1].replace("'\\''", "'"))


def close(shown: str, value: float, places: int = 4) -> bool:
    return abs(float(shown) - value) <= 0.5 * 10 ** -places + 1e-9


def test_columns_stream_the_api_text_and_explain_each_token(server, browser):
    page = Page(browser, server)
    page.keep_columns(2)
    page.set("endpoint", "completions")
    page.set("prompt", PROMPT)
    page.set("max-tokens", 12)
    page.set("temperature", 0.9)
    page.set("seed", 7)
    page.set("best-of", 1)
    page.recipe(0, "weights")
    for policy in ("base", "dpo", "safe", "small", "formal"):
        page.weight(0, policy, 0)
    page.weight(0, "base", 0.5)
    page.weight(0, "dpo", 0.5)
    page.recipe(1, "dera", **{"Reference": "base", "Tuned policy": "dpo"})
    loading = browser.network()  # the page and its assets, settings and models
    # count the text updates of each column while it streams
    browser.driver.execute_script("""
        window.__updates = [0, 0];
        document.querySelectorAll('#columns .column .text').forEach((t, i) =>
            new MutationObserver(() => window.__updates[i]++).observe(t, {childList: true}));""")
    page.run()
    events = browser.network()

    common = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.9, "seed": 7}
    expected = [
        {"model": "base", "mixture": {"weights": {"base": 0.5, "dpo": 0.5}}, **common},
        {"model": "dpo", "mixture": {"reference": "base", "policy": "dpo", "beta": 0.1, "beta_prime": 0.05}, **common},
    ]
    answers = []
    for i, body in enumerate(expected):
        col = page.columns()[i]
        r = api(server, "completions", {**body, "logprobs": 5, "return_token_signals": True})
        assert r.status_code == 200, r.text
        answer = r.json()
        answers.append(answer)
        assert page.text(col) == answer["choices"][0]["text"] and answer["choices"][0]["text"]
        assert page.shown_weights(col) == pytest.approx(answer["policymix"]["weights"], abs=5e-4)
        # the same text without logprobs or signals: the page's extras do not change what is sampled
        plain = api(server, "completions", body).json()
        assert plain["choices"][0]["text"] == answer["choices"][0]["text"]
    assert page.shown_weights(page.columns()[1]) == pytest.approx({"dpo": 2.0, "base": -1.0}, abs=5e-4)

    # streamed: both answers came as event streams, in parallel, and the text grew chunk by chunk
    streams = event_stream_urls(events)
    assert streams == [f"{server.url}/v1/completions"] * 2
    sent = {e["params"]["requestId"]: e["params"]["timestamp"] for e in events
            if e["method"] == "Network.requestWillBeSent" and e["params"]["request"]["url"].endswith("/v1/completions")}
    finished = {e["params"]["requestId"]: e["params"]["timestamp"] for e in events
                if e["method"] == "Network.loadingFinished" and e["params"]["requestId"] in sent}
    assert len(sent) == 2 and max(sent.values()) < min(finished.values())
    updates = browser.driver.execute_script("return window.__updates")
    assert all(u >= 2 for u in updates), updates

    # why this token: hover the third token button of column 1
    from selenium.webdriver import ActionChains

    col = page.columns()[0]
    buttons = col.find_elements("css selector", ".text .tok")
    ActionChains(browser.driver).scroll_to_element(buttons[2]).move_to_element(buttons[2]).perform()
    why = wait(lambda: col.find_elements("css selector", ".why .token-why"), what="the token's explanation")[0]
    i = int(why.get_attribute("data-index"))
    signal = answers[0]["policymix"]["token_signals"][i]
    logprobs = answers[0]["choices"][0]["logprobs"]
    weights = answers[0]["policymix"]["weights"]
    rows = page.tables(why, "policies")
    assert [r[0] for r in rows[:-1]] == list(signal["policy_logprobs"])
    for policy, logp, w, contribution in rows[:-1]:
        api_logp = signal["policy_logprobs"][policy]
        assert close(logp, api_logp) and close(w, weights[policy], 3)
        assert close(contribution, weights[policy] * api_logp)
    assert close(rows[-1][3], sum(weights[p] * lp for p, lp in signal["policy_logprobs"].items()))
    shown_kl, shown_reward = re.findall(r"-?\d+\.\d+", why.find_element("css selector", ".signals").text)[-2:]
    assert close(shown_kl, signal["kl"]) and close(shown_reward, signal["implicit_reward"])
    assert f"mixed logprob {logprobs['token_logprobs'][i]:.4f}" in why.find_element("css selector", "h4").text
    top = sorted(logprobs["top_logprobs"][i].items(), key=lambda kv: -kv[1])[:5]
    shown_top = page.tables(why, "alternatives")
    assert len(shown_top) == 5
    for (tok, lp), (shown_tok, shown_lp, _) in zip(top, shown_top):
        assert close(shown_lp, lp)
        assert shown_tok.replace("␣", " ").replace("⏎", "\n") == tok or "\\x" in shown_tok
    chart = col.find_element("css selector", ".chart")
    assert chart.is_displayed() and len(chart.find_elements("css selector", "polyline")) == 2

    # keyboard: from the focused token, the arrow key moves to the next one and explains it
    from selenium.webdriver.common.keys import Keys

    buttons[0].click()
    browser.driver.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    focused = browser.driver.switch_to.active_element
    assert focused == buttons[1]
    first_of_next = int(buttons[1].get_attribute("data-tokens").split()[0])
    assert int(col.find_element("css selector", ".why .token-why").get_attribute("data-index")) == first_of_next

    # copy as request: the curl body and the SDK script reproduce the column
    col.find_element("css selector", ".snippets summary").click()
    curl = col.find_element("css selector", ".snippet-curl").get_attribute("textContent")
    body = snippet_body(curl)
    assert f"{server.url}/v1/completions" in curl and "stream" not in body
    assert api(server, "completions", body).json()["choices"][0]["text"] == page.text(col)
    script = col.find_element("css selector", ".snippet-python").get_attribute("textContent")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "POLICYMIX_API_KEY": KEY})
    assert out.returncode == 0, out.stderr
    assert out.stdout == page.text(col) + "\n" + str(answers[0]["policymix"]["weights"]) + "\n"

    # the key lives in the page's memory only
    assert browser.driver.execute_script(
        "return [localStorage.length, sessionStorage.length, document.cookie]") == [0, 0, ""]
    # no console error (a request blocked by the page's CSP would be one), and nothing but the
    # server was asked for anything
    assert [e for e in browser.driver.get_log("browser") if e["level"] == "SEVERE"] == []
    urls = requested_urls(loading + events + browser.network())
    assert f"{server.url}/playground/app.js" in urls and f"{server.url}/v1/models" in urls
    assert hosts(urls) == {f"127.0.0.1:{server.port}"}


def test_four_recipe_forms_compile_as_the_api_does(server, browser):
    from selenium.webdriver.common.keys import Keys

    page = Page(browser, server)
    page.keep_columns(1)
    page.set("endpoint", "completions")
    page.set("prompt", PROMPT)
    page.set("max-tokens", 6)
    page.set("temperature", 0)
    page.set("best-of", 1)
    page.recipe(0, "mod", Reference="base")
    page.weight(0, "dpo", 0.6)
    small = page.column(0).find_element("css selector", "input[type=range][data-name='small']")
    for _ in range(8):  # the keyboard moves a slider in steps of 0.05; its number box follows
        small.send_keys(Keys.ARROW_RIGHT)
    assert page.column(0).find_element("css selector", "input.slider-value[data-name='small']") \
        .get_attribute("value") == "0.4"
    page.recipe(1, "proxy", **{"Large base": "base", "Small tuned": "dpo", "Small untuned": "small"})
    page.slider(1, 1.5)
    page.recipe(2, "guidance", Policy="base")
    page.column(2).find_element("css selector", ".kind-form input[type=text]").send_keys("Answer rudely.")
    page.recipe(3, "model", Model="balanced")
    assert not page.d.find_element("id", "add-column").is_enabled()  # 4 columns at most
    page.run()
    common = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "seed": 1}
    expected = [
        {"model": "dpo", "mixture": {"reference": "base", "objectives": {"dpo": 0.6, "small": 0.4}}},
        {"model": "base", "mixture": {"proxy": {"base": "base", "tuned": "dpo", "untuned": "small", "alpha": 1.5}}},
        {"model": "base", "mixture": {"guidance": {"policy": "base", "scale": 1.5, "negative_prompt": "Answer rudely."}}},
        {"model": "balanced"},
    ]
    for col, body in zip(page.columns(), expected):
        sent = snippet_body(col.find_element("css selector", ".snippet-curl").get_attribute("textContent"))
        assert {k: sent.get(k) for k in body} == body
        answer = api(server, "completions", {**body, **common}).json()
        assert page.text(col) == answer["choices"][0]["text"]
        assert page.shown_weights(col) == pytest.approx(answer["policymix"]["weights"], abs=5e-4)


def test_arm_form_sends_the_recipe_the_api_compiles(server, browser):
    page = Page(browser, server)
    page.keep_columns(1)
    page.set("endpoint", "completions")
    page.set("prompt", PROMPT)
    page.set("max-tokens", 6)
    page.set("temperature", 0)
    page.set("best-of", 1)
    page.recipe(0, "arm", Base="base")
    page.weight(0, "dpo", 0.5)
    page.weight(0, "base", 2)  # the base's own slider is skipped: it is the base (weight 1)
    page.slider(0, 0.25)
    page.run()
    body = {"model": "base", "mixture": {"arm": {"base": "base", "arms": {"dpo": 0.5}, "beta": 0.25}}}
    col = page.column(0)
    sent = snippet_body(col.find_element("css selector", ".snippet-curl").get_attribute("textContent"))
    assert {k: sent.get(k) for k in body} == body
    answer = api(server, "completions", {**body, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "seed": 1}).json()
    assert answer["policymix"]["weights"] == pytest.approx({"base": 1.0, "dpo": 2.0})
    assert page.text(col) == answer["choices"][0]["text"]
    assert page.shown_weights(col) == pytest.approx(answer["policymix"]["weights"], abs=5e-4)


def test_chat_with_a_system_prompt_and_context_aware_decoding(server, browser):
    page = Page(browser, server)
    page.keep_columns(2)
    page.set("endpoint", "chat")
    page.set("system", "Answer formally.")
    page.set("prompt", "Hello world")
    page.set("max-tokens", 8)
    page.set("temperature", 0.8)
    page.set("seed", 5)
    page.set("best-of", 1)
    page.recipe(0, "context_aware", Policy="dpo")
    page.slider(0, 0.75)
    page.recipe(1, "model", Model="formal")
    page.run()
    messages = [{"role": "system", "content": "Answer formally."}, {"role": "user", "content": "Hello world"}]
    common = {"messages": messages, "max_tokens": 8, "temperature": 0.8, "seed": 5}
    expected = [{"model": "dpo", "mixture": {"context_aware": {"policy": "dpo", "alpha": 0.75, "drop": "system"}}},
                {"model": "formal"}]
    for col, body in zip(page.columns(), expected):
        answer = api(server, "chat/completions", {**body, **common}).json()
        assert page.text(col) == answer["choices"][0]["message"]["content"]
        assert page.shown_weights(col) == pytest.approx(answer["policymix"]["weights"], abs=5e-4)
    assert page.shown_weights(page.columns()[0]) == pytest.approx({"dpo": 1.75, "dpo[-system]": -0.75}, abs=5e-4)


def test_guard_refusal_shows_the_guards_message(server, browser):
    page = Page(browser, server)
    page.keep_columns(1)
    page.set("endpoint", "completions")
    page.set("best-of", 1)
    page.recipe(0, "weights")
    for policy, w in {"base": 1, "dpo": 1, "safe": -1, "small": 0, "formal": 0}.items():
        page.weight(0, policy, w)
    page.run(keyboard=True)
    col = page.columns()[0]
    body = snippet_body(col.find_element("css selector", ".snippet-curl").get_attribute("textContent"))
    assert body["mixture"] == {"weights": {"base": 1, "dpo": 1, "safe": -1}}
    refusal = api(server, "completions", body)
    assert refusal.status_code == 403 and refusal.json()["error"]["code"] == "mixing_guard"
    error = col.find_element("css selector", ".error")
    assert error.is_displayed() and error.text == refusal.json()["error"]["message"]
    assert "HTTP 403" in col.find_element("css selector", ".column-status").text
    assert hosts(requested_urls(browser.network())) == {f"127.0.0.1:{server.port}"}


def test_best_of_shows_candidates_scores_and_the_kl_bound(server, browser):
    page = Page(browser, server)
    page.keep_columns(1)
    page.set("endpoint", "chat")
    page.set("prompt", "Hello world")
    page.set("max-tokens", 6)
    page.set("temperature", 1.0)
    page.set("seed", 3)
    page.set("best-of", 3)
    page.set("rerank", "implicit")
    page.set("rerank-policy", "dpo")
    page.set("rerank-reference", "base")
    page.recipe(0, "model", Model="balanced")
    page.run()
    col = page.columns()[0]
    body = {"model": "balanced", "messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 6,
            "temperature": 1.0, "seed": 3, "best_of": 3,
            "rerank": {"implicit": {"policy": "dpo", "reference": "base", "beta": 0.1}}}
    answer = api(server, "chat/completions", body).json()
    assert page.text(col) == answer["choices"][0]["message"]["content"]
    rows = page.tables(col, "cands")
    candidates = answer["policymix"]["candidates"]
    assert len(rows) == len(candidates) == 3
    for row, cand in zip(rows, candidates):
        assert close(row[2], cand["score"]) and row[3] == cand["finish_reason"]
    winners = [r for r in rows if "returned" in r[4]]
    assert len(winners) == 1
    best = max(range(3), key=lambda k: candidates[k]["score"])
    assert winners[0][0] == str(best + 1)  # hard best-of returns the top score
    bound = col.find_element("css selector", ".kl-bound").text
    assert close(bound.rsplit("= ", 1)[1], answer["policymix"]["kl_bound"])


def test_accessibility_axe_wcag_aa_wide_and_narrow(server, browser):
    page = Page(browser, server)
    page.keep_columns(2)
    page.set("endpoint", "completions")
    page.set("best-of", 2)
    page.set("temperature", 0.8)
    page.set("max-tokens", 8)
    page.run()
    for col in page.columns():  # open every panel, so that tables, chart and snippets are checked too
        col.find_element("css selector", ".text .tok").click()
        col.find_element("css selector", ".snippets summary").click()
    driver = browser.driver
    driver.execute_script(AXE.read_text(encoding="utf-8"))
    for width in (1400, 420):
        driver.set_window_size(width, 1000)
        result = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}})"
            ".then(r => done({violations: r.violations.map(v => ({id: v.id, help: v.help,"
            " nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))})), passes: r.passes.length}))"
            ".catch(e => done({error: String(e)}))")
        assert "error" not in result, result
        assert result["violations"] == [], f"at {width}px: {json.dumps(result['violations'], indent=1)}"
        assert result["passes"] > 10  # axe really ran its rules
    driver.set_window_size(1400, 1000)
