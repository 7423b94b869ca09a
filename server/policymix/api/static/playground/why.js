// One column's answer: the streamed text as token buttons, "why this token" (each policy's
// log-probability and its weighted contribution w_k log pi_k, the mixed top-5, the step's KL and
// implicit reward), a chart of KL and reward along the response, and best-of-n candidates.
//
// Text and tokens: each stream chunk carries its tokens' logprobs and the text they released. A
// token whose text is held back (part of a UTF-8 character, a possible stop string) joins the next
// chunk that has text, so the page shows exactly the API's text and every token stays reachable.

import { el } from "./recipe.js";

const SVG = "http://www.w3.org/2000/svg";
const fmt = (x, d = 4) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(d));

function table(caption, head, rows, cls) {
  const t = el("table", { class: cls });
  t.append(el("caption", { text: caption }));
  t.append(el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { scope: "col", text: h })))));
  t.append(el("tbody", {}, ...rows.map((r) => el("tr", { class: r.cls ?? "" },
    ...r.cells.map((c, i) => (i === 0 ? el("th", { scope: "row", text: c }) : el("td", { text: c })))))));
  return t;
}

// Token text made visible: spaces and control characters shown, not swallowed.
const printable = (t) => t.replace(/[\u0000-\u0009\u000b-\u001f]/g,
  (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`);
const visible = (t) => printable(t).replace(/ /g, "␣").replace(/\n/g, "⏎");

export class Answer {
  constructor(column) {
    this.textBox = column.querySelector(".text");
    this.why = column.querySelector(".why");
    this.chart = column.querySelector(".chart");
    this.candidatesBox = column.querySelector(".candidates");
    this.weightsBox = column.querySelector(".weights");
    this.textBox.addEventListener("keydown", (e) => this.onKey(e));
    this.reset();
  }

  reset() {
    this.tokens = [];  // {token, logprob, top}, one per generated token, in order
    this.pending = [];  // token indices whose text has not arrived yet
    this.buttons = [];
    this.text = "";
    this.weights = null;
    this.signals = null;
    this.selected = null;
    this.textBox.replaceChildren();
    this.textBox.setAttribute("aria-label", "Generated text: one button per token");
    this.weightsBox.replaceChildren();
    this.why.replaceChildren(el("p", { class: "hint",
      text: "Hover, click or focus a token (arrow keys move) to see why it was chosen." }));
    this.chart.hidden = true;
    this.candidatesBox.hidden = true;
  }

  add(chunk) {
    const first = this.tokens.length;
    this.tokens.push(...chunk.tokens);
    for (let i = first; i < this.tokens.length; i++) this.pending.push(i);
    if (chunk.text) {
      this.text += chunk.text;
      this.addButton(chunk.text, this.pending);
      this.pending = [];
    }
    if (chunk.policymix) this.finish(chunk.policymix);
  }

  addButton(text, indices, cls = "tok") {
    const b = el("button", { type: "button", class: cls, tabindex: this.buttons.length ? "-1" : "0",
                             "data-tokens": indices.join(" ") });
    b.textContent = text;
    b.addEventListener("mouseenter", () => this.show(b));
    b.addEventListener("focus", () => this.show(b));
    b.addEventListener("click", () => this.show(b));
    this.buttons.push(b);
    this.textBox.append(b);
  }

  finish(policymix) {
    if (this.pending.length) {  // tokens that released no text (an end-of-sequence token, a stop string)
      this.addButton("∎", this.pending, "tok end");
      this.buttons.at(-1).setAttribute("aria-label", "tokens without text");
      this.pending = [];
    }
    this.weights = policymix.weights || {};
    this.signals = policymix.token_signals || null;
    this.weightsBox.replaceChildren(el("strong", { text: "Compiled weights: " }),
      el("span", { class: "weights-values",
                   text: Object.entries(this.weights).map(([p, w]) => `${p} ${fmt(w, 3)}`).join(" · ") }));
    if (policymix.kl_to_reference !== null && policymix.kl_to_reference !== undefined) {
      this.weightsBox.append(el("span", { class: "totals",
        text: ` · KL to reference ${fmt(policymix.kl_to_reference, 3)} · implicit reward ${fmt(policymix.implicit_reward, 3)}` }));
    }
    this.drawChart();
    this.drawCandidates(policymix);
    if (this.selected) this.show(this.selected);
  }

  onKey(e) {
    const i = this.buttons.indexOf(document.activeElement);
    if (i < 0) return;
    const j = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1, Home: 0,
                End: this.buttons.length - 1 }[e.key];
    if (j === undefined || j < 0 || j >= this.buttons.length) return;
    e.preventDefault();
    this.buttons[i].tabIndex = -1;
    this.buttons[j].tabIndex = 0;
    this.buttons[j].focus();
  }

  show(button) {
    if (this.selected) this.selected.classList.remove("selected");
    this.selected = button;
    button.classList.add("selected");
    const indices = button.dataset.tokens ? button.dataset.tokens.split(" ").map(Number) : [];
    this.why.replaceChildren(...indices.map((i) => this.explain(i)));
    if (!indices.length) this.why.append(el("p", { class: "hint", text: "This text came with no token of its own." }));
    this.drawChart(indices.at(-1));
  }

  // Everything known about generated token i.
  explain(i) {
    const t = this.tokens[i];
    const s = this.signals ? this.signals[i] : null;
    const box = el("div", { class: "token-why", "data-index": String(i) });
    box.append(el("h4", {}, `Token ${i + 1}: `, el("code", { class: "token-text", text: visible(t.token) }),
                  ` · mixed logprob ${fmt(t.logprob)}`));
    if (s) {
      let score = 0;
      const rows = Object.entries(s.policy_logprobs).map(([p, lp]) => {
        const w = this.weights[p] ?? 0;
        score += w * lp;
        return { cells: [p, fmt(lp), fmt(w, 3), fmt(w * lp)] };
      });
      rows.push({ cls: "sum", cells: ["mixed score s", "", "", fmt(score)] });
      box.append(table("Each policy's log-probability of this token and its weighted contribution",
                       ["policy", "log π_k", "w_k", "w_k log π_k"], rows, "policies"));
      box.append(el("p", { class: "signals" },
        `KL(q ‖ ref) at this step: ${fmt(s.kl)} · implicit reward β(log π − log π_ref): ${fmt(s.implicit_reward)}`));
    } else {
      box.append(el("p", { class: "hint", text: "Per-policy log-probabilities arrive with the last chunk." }));
    }
    const top = t.top.slice(0, 5);
    box.append(table("Mixed top-5 alternatives (log_softmax of s)", ["token", "logprob", "probability"],
      top.map(([tok, lp]) => ({ cls: tok === t.token ? "chosen" : "",
                                cells: [visible(tok), fmt(lp), `${(100 * Math.exp(lp)).toFixed(1)}%`] })), "alternatives"));
    return box;
  }

  // KL and implicit reward along the response (SVG polylines, one scale each), the selected token marked.
  drawChart(mark) {
    const svg = this.chart.querySelector("svg");
    const sig = this.signals;
    if (!sig || !sig.length || sig.every((s) => s.kl === null && s.implicit_reward === null)) {
      this.chart.hidden = true;
      return;
    }
    this.chart.hidden = false;
    svg.replaceChildren();
    const W = 300, H = 110, pad = 6;
    const x = (i) => pad + (sig.length === 1 ? 0 : (i * (W - 2 * pad)) / (sig.length - 1));
    const line = (key, cls) => {
      const vals = sig.map((s) => s[key]).filter((v) => v !== null);
      if (!vals.length) return;
      const lo = Math.min(0, ...vals), hi = Math.max(0, ...vals), span = hi - lo || 1;
      const y = (v) => H - pad - ((v - lo) * (H - 2 * pad)) / span;
      const p = document.createElementNS(SVG, "polyline");
      p.setAttribute("points", sig.map((s, i) => (s[key] === null ? "" : `${x(i).toFixed(1)},${y(s[key]).toFixed(1)}`)).join(" "));
      p.setAttribute("class", cls);
      svg.append(p);
      return [Math.min(...vals), Math.max(...vals)];
    };
    const kl = line("kl", "kl-line");
    const rw = line("implicit_reward", "reward-line");
    if (mark !== undefined && mark < sig.length) {
      const m = document.createElementNS(SVG, "line");
      for (const [k, v] of [["x1", x(mark)], ["x2", x(mark)], ["y1", 0], ["y2", H]]) m.setAttribute(k, String(v));
      m.setAttribute("class", "mark");
      svg.append(m);
    }
    const range = (r) => (r ? `from ${fmt(r[0], 2)} to ${fmt(r[1], 2)}` : "not available");
    this.chart.querySelector(".kl-key").textContent = `KL(q ‖ ref) per token, ${range(kl)}`;
    this.chart.querySelector(".reward-key").textContent = `implicit reward per token, ${range(rw)}`;
    svg.setAttribute("aria-label", `Chart over ${sig.length} tokens: KL to the reference ${range(kl)}; implicit reward ${range(rw)}`);
  }

  drawCandidates(policymix) {
    const cands = policymix.candidates;
    if (!cands || !cands.length) { this.candidatesBox.hidden = true; return; }
    // the returned candidate is the one whose text the stream carried (the top score, unless soft best-of drew another)
    let winner = cands.findIndex((c) => c.text === this.text);
    if (winner < 0) winner = cands.reduce((b, c, i) => (c.score > cands[b].score ? i : b), 0);
    const rows = cands.map((c, i) => ({ cls: i === winner ? "winner" : "",
      cells: [String(i + 1), printable(c.text), fmt(c.score), c.finish_reason, i === winner ? "★ returned" : ""] }));
    this.candidatesBox.replaceChildren(
      table(`Best-of-${cands.length} candidates`, ["#", "text", "score", "finish", "winner"], rows, "cands"),
      el("p", { class: "kl-bound", text: `KL(best-of-n ‖ policy) ≤ log n − (n−1)/n = ${fmt(policymix.kl_bound)}` }));
    this.candidatesBox.hidden = false;
  }
}
