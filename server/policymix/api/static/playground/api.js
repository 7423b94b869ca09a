// Talking to this server's OpenAI-compatible API: request bodies, the SSE stream, copyable snippets.
// URLs are relative to the page, so the page works behind a proxy that serves it under a prefix.

const TOP_LOGPROBS = 5;  // the mixed top-5 alternatives shown for each token

let apiKey = "";  // in this page's memory only: never stored, sent only to this server's API

export function setKey(key) { apiKey = key.trim(); }

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

// An error as the API sent it ({"error": {"message", ...}}), with the HTTP status.
export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || null;
    this.param = error.param || null;
  }
}

async function failure(resp) {
  let body = null;
  try { body = await resp.json(); } catch { /* not JSON: a proxy's page */ }
  return new ApiError(resp.status, (body && body.error) || { message: `HTTP ${resp.status} ${resp.statusText}` });
}

export async function getJSON(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

// The body for one column: shared settings + its recipe. Everything that decides the text is here.
export function requestBody(shared, recipe) {
  const body = { model: recipe.model, max_tokens: shared.maxTokens, temperature: shared.temperature,
                 seed: shared.seed };
  if (shared.endpoint === "chat") {
    body.messages = [{ role: "user", content: shared.prompt }];
    if (shared.system) body.messages.unshift({ role: "system", content: shared.system });
    body.logprobs = true;
    body.top_logprobs = TOP_LOGPROBS;
  } else {
    body.prompt = shared.prompt;
    body.logprobs = TOP_LOGPROBS;
  }
  if (recipe.mixture !== undefined) body.mixture = recipe.mixture;
  body.return_token_signals = true;
  if (shared.bestOf > 1) {
    body.best_of = shared.bestOf;
    if (shared.rerank !== undefined) body.rerank = shared.rerank;
  }
  return body;
}

export function endpointPath(endpoint) {
  return endpoint === "chat" ? "v1/chat/completions" : "v1/completions";
}

// One streamed chunk in a common shape for both endpoints.
function normalise(chunk, endpoint) {
  const choice = (chunk.choices || [])[0];
  const out = { text: "", tokens: [], finish: null, policymix: chunk.policymix || null };
  if (!choice) return out;
  out.finish = choice.finish_reason || null;
  if (endpoint === "chat") {
    out.text = (choice.delta && choice.delta.content) || "";
    for (const t of (choice.logprobs && choice.logprobs.content) || []) {
      out.tokens.push({ token: t.token, logprob: t.logprob,
                        top: (t.top_logprobs || []).map((a) => [a.token, a.logprob]) });
    }
  } else {
    out.text = choice.text || "";
    const lp = choice.logprobs;
    if (lp) {
      lp.tokens.forEach((token, i) => {
        // completions: a dict of the top k plus the chosen token
        const top = Object.entries(lp.top_logprobs[i] || {}).sort((a, b) => b[1] - a[1]);
        out.tokens.push({ token, logprob: lp.token_logprobs[i], top });
      });
    }
  }
  return out;
}

// POST with stream: true and call onChunk for every event; resolves when [DONE] arrives.
export async function stream(endpoint, body, onChunk, signal) {
  const resp = await fetch(endpointPath(endpoint), {
    method: "POST", headers: headers(), signal,
    body: JSON.stringify({ ...body, stream: true }),
  });
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ")) continue;
      const payload = event.slice(6);
      if (payload === "[DONE]") return;
      const chunk = JSON.parse(payload);
      if (chunk.error) throw new ApiError(resp.status, chunk.error);  // failed after the stream began
      onChunk(normalise(chunk, endpoint));
    }
  }
}

// ------------------------------------------------------------------------------------- snippets

function shellQuote(s) { return `'${s.replaceAll("'", "'\\''")}'`; }

// A JSON value as a Python literal (JSON strings and numbers are valid Python).
function py(value) {
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return `[${value.map(py).join(", ")}]`;
  if (typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${py(v)}`).join(", ")}}`;
  }
  return JSON.stringify(value);
}

// Fields the OpenAI SDK takes as keyword arguments; the rest go in extra_body.
const SDK_FIELDS = {
  completions: ["model", "prompt", "max_tokens", "temperature", "seed", "logprobs", "best_of"],
  chat: ["model", "messages", "max_tokens", "temperature", "seed", "logprobs", "top_logprobs"],
};

export function snippets(endpoint, body) {
  const base = new URL("v1", document.baseURI).href;
  const curl = [`curl -s ${base}/${endpointPath(endpoint).slice(3)} \\`,
                `  -H 'Content-Type: application/json' -H "Authorization: Bearer $POLICYMIX_API_KEY" \\`,
                `  -d ${shellQuote(JSON.stringify(body))}`].join("\n");
  const kwargs = [];
  const extra = {};
  for (const [k, v] of Object.entries(body)) {
    if (SDK_FIELDS[endpoint].includes(k)) kwargs.push(`    ${k}=${py(v)},`);
    else extra[k] = v;
  }
  if (Object.keys(extra).length) kwargs.push(`    extra_body=${py(extra)},`);
  const call = endpoint === "chat" ? "client.chat.completions.create" : "client.completions.create";
  const text = endpoint === "chat" ? "r.choices[0].message.content" : "r.choices[0].text";
  const python = [
    "import os",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(base)}, api_key=os.environ.get("POLICYMIX_API_KEY", "none"))`,
    `r = ${call}(`, ...kwargs, ")",
    `print(${text})`,
    'print(r.model_extra["policymix"]["weights"])',
  ].join("\n");
  return { curl, python };
}
