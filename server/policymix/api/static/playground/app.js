// The playground's wiring: load the models, keep up to 4 recipe columns, run them in parallel.

import { ApiError, getJSON, requestBody, setKey, snippets, stream } from "./api.js";
import { recipeEditor } from "./recipe.js";
import { Answer } from "./why.js";

const MAX_COLUMNS = 4;
const $ = (sel) => document.querySelector(sel);

let settings = { guard: { max_abs_weight: 8, max_sum_abs_weight: 16 }, keys_required: false };
let catalog = null;  // {policies, mixtures, rewards} from /v1/models
const columns = [];  // {node, editor, answer, controller}

function status(text) { $("#server-status").textContent = text; }

async function loadModels() {
  try {
    const models = (await getJSON("v1/models")).data;
    const of = (kind) => models.filter((m) => m.policymix && m.policymix.kind === kind).map((m) => m.id);
    catalog = { policies: of("policy"), mixtures: of("mixture"), rewards: of("reward") };
  } catch (err) {
    catalog = null;
    status(err.status === 401 ? `This server needs an API key: ${err.message}` : `Could not list the models: ${err.message}`);
    return;
  }
  status(`${catalog.policies.length} policies, ${catalog.mixtures.length} named mixtures` +
         (catalog.rewards.length ? `, ${catalog.rewards.length} reward models` : "") + ".");
  fillRerank();
  columns.splice(0).forEach((c) => c.node.remove());
  addColumn({ kind: "weights" });
  addColumn({ kind: "model", model: catalog.mixtures[0] ?? catalog.policies[0] });
}

function fillRerank() {
  const rerank = $("#rerank");
  rerank.replaceChildren(new Option("mean log-probability", "logprob"),
                         new Option("implicit reward (policy vs reference)", "implicit"),
                         ...catalog.rewards.map((r) => new Option(`reward model ${r}`, `rm:${r}`)));
  for (const s of document.querySelectorAll(".policy-select")) {
    s.replaceChildren(...catalog.policies.map((p) => new Option(p, p)));
  }
  if (catalog.policies.length > 1) $("#rerank-policy").value = catalog.policies[1];
}

function rerankSpec() {
  const v = $("#rerank").value;
  if (v === "implicit") {
    return { implicit: { policy: $("#rerank-policy").value, reference: $("#rerank-reference").value,
                         beta: Number($("#rerank-beta").value) } };
  }
  if (v.startsWith("rm:")) return { reward_model: v.slice(3) };
  return "logprob";
}

function shared() {
  return { endpoint: $("#endpoint").value, prompt: $("#prompt").value, system: $("#system").value.trim(),
           maxTokens: Number($("#max-tokens").value), temperature: Number($("#temperature").value),
           seed: Number($("#seed").value), bestOf: Number($("#best-of").value), rerank: rerankSpec() };
}

function renumber() {
  columns.forEach((c, i) => {
    c.node.querySelector(".column-title").textContent = `Recipe ${i + 1}`;
    c.node.setAttribute("aria-label", `Recipe ${i + 1}`);
  });
  $("#add-column").disabled = columns.length >= MAX_COLUMNS;
  for (const c of columns) c.node.querySelector(".remove").disabled = columns.length === 1;
}

function addColumn(preset = {}) {
  if (!catalog || columns.length >= MAX_COLUMNS) return;
  const node = $("#column-template").content.firstElementChild.cloneNode(true);
  $("#columns").append(node);
  const column = { node, editor: recipeEditor(node.querySelector(".recipe"), catalog, settings.guard, preset),
                   answer: new Answer(node), controller: null };
  node.querySelector(".remove").addEventListener("click", () => {
    if (column.controller) column.controller.abort();
    columns.splice(columns.indexOf(column), 1);
    node.remove();
    renumber();
  });
  for (const [button, which] of [[".copy-curl", ".snippet-curl"], [".copy-python", ".snippet-python"]]) {
    node.querySelector(button).addEventListener("click", async (e) => {
      try {
        await navigator.clipboard.writeText(node.querySelector(which).textContent);
        e.target.textContent = "Copied";
      } catch {
        e.target.textContent = "Select the text to copy";  // no clipboard on plain-http origins
      }
    });
  }
  columns.push(column);
  renumber();
}

async function runColumn(column, common) {
  const { node, answer } = column;
  const say = (t) => { node.querySelector(".column-status").textContent = t; };
  const errorBox = node.querySelector(".error");
  errorBox.hidden = true;
  answer.reset();
  const body = requestBody(common, column.editor.read());
  const snip = snippets(common.endpoint, body);
  node.querySelector(".snippet-curl").textContent = snip.curl;
  node.querySelector(".snippet-python").textContent = snip.python;
  if (column.controller) column.controller.abort();
  column.controller = new AbortController();
  node.classList.add("running");
  say(body.best_of ? `Sampling ${body.best_of} candidates…` : "Streaming…");
  let finish = null;
  try {
    await stream(common.endpoint, body, (chunk) => {
      answer.add(chunk);
      finish = chunk.finish ?? finish;
      say(`Streaming… ${answer.tokens.length} tokens`);
    }, column.controller.signal);
    say(`Done: ${answer.tokens.length} tokens, finish reason ${finish}.`);
  } catch (err) {
    if (err.name === "AbortError") { say("Stopped."); return; }
    say(err instanceof ApiError ? `Refused (HTTP ${err.status}).` : "Failed.");
    errorBox.textContent = err.message;  // the API's own message, e.g. the mixing guard's 403
    errorBox.hidden = false;
  } finally {
    node.classList.remove("running");
  }
}

async function runAll() {
  const common = shared();
  $("#run").disabled = true;
  try {
    await Promise.all(columns.map((c) => runColumn(c, common)));  // parallel streams, one per column
  } finally {
    $("#run").disabled = false;
  }
}

async function start() {
  try {
    settings = await getJSON("playground/settings.json");
  } catch { /* the defaults above are the guard's defaults */ }
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setKey($("#api-key").value);
    loadModels();
  });
  $("#request-form").addEventListener("submit", (e) => { e.preventDefault(); runAll(); });
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); runAll(); }
  });
  $("#add-column").addEventListener("click", () => addColumn({ kind: "weights" }));
  $("#rerank").addEventListener("change", () => {
    for (const f of document.querySelectorAll(".rerank-implicit")) f.hidden = $("#rerank").value !== "implicit";
  });
  if (settings.keys_required) {
    status("This server needs an API key: enter it above.");
    $("#api-key").focus();
  } else {
    await loadModels();
  }
}

start();
