// The recipe editor of one column: a form per recipe kind (docs/api.md, "Recipes") that yields
// {model, mixture}. Sliders stay within the guard's weight bound; the guard itself still decides
// (its 403 is shown as the message it returns).

export const KINDS = {
  model: "Model alone or named mixture",
  weights: "Explicit weights",
  mod: "Multi-objective (MOD)",
  dera: "Realignment (DeRa, beta')",
  proxy: "Proxy tuning",
  guidance: "Guidance (CFG)",
  context_aware: "Context-aware decoding (chat)",
  arm: "Reward-model guidance (GenARM)",
};

let uid = 0;
const nextId = (stem) => `${stem}-${++uid}`;

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

function field(label, control, cls = "field") {
  if (!control.id) control.id = nextId("f");
  return el("div", { class: cls }, el("label", { for: control.id, text: label }), control);
}

function select(names, value, extra = {}) {
  const s = el("select", extra);
  for (const n of names) s.append(el("option", { value: n, text: n }));
  if (value !== undefined && names.includes(value)) s.value = value;
  return s;
}

// A range slider with a number box beside it (typing an exact value, or arrow keys on either).
function slider(label, { min, max, step, value, name }) {
  const range = el("input", { type: "range", min, max, step, value, "data-name": name ?? "" });
  const box = el("input", { type: "number", min, max, step, value, class: "slider-value", "data-name": name ?? "" });
  range.id = nextId("r");
  box.id = nextId("n");
  box.setAttribute("aria-label", `${label} (exact value)`);
  range.addEventListener("input", () => { box.value = range.value; });
  box.addEventListener("input", () => { if (box.value !== "") range.value = box.value; });
  const row = el("div", { class: "slider" }, el("label", { for: range.id, text: label }), range, box);
  return { row, read: () => Number(box.value === "" ? range.value : box.value) };
}

const num = (s) => (s.trim() === "" ? undefined : Number(s));

// Build the editor inside `root`; returns {read() -> {model, mixture}, kind}.
export function recipeEditor(root, catalog, guard, preset = {}) {
  const { policies, mixtures } = catalog;
  const bound = guard.max_abs_weight;
  const kind = select(Object.keys(KINDS), preset.kind ?? "weights", { class: "kind" });
  for (const opt of kind.options) opt.textContent = KINDS[opt.value];
  const body = el("div", { class: "kind-form" });
  root.replaceChildren(field("Recipe", kind), body);
  let read = () => ({});

  function build() {
    body.replaceChildren();
    const k = kind.value;
    if (k === "model") {
      const m = select([...policies, ...mixtures], preset.model ?? policies[0], { class: "model" });
      body.append(field("Model", m));
      read = () => ({ model: m.value });
    } else if (k === "weights") {
      const sliders = policies.map((p, i) => slider(p, {
        min: -bound, max: bound, step: 0.05, value: preset.weights?.[p] ?? (i === 0 ? 1 : 0), name: p }));
      const sum = el("p", { class: "hint sum" });
      const update = () => {
        const total = sliders.reduce((a, s) => a + Math.abs(s.read()), 0);
        sum.textContent = `sum |w| = ${total.toFixed(2)} (guard bound ${guard.max_sum_abs_weight})`;
      };
      const set = el("fieldset", {}, el("legend", { text: "Weight per policy (0: not run)" }), ...sliders.map((s) => s.row));
      set.addEventListener("input", update);
      update();
      body.append(set, sum);
      read = () => {
        const weights = {};
        policies.forEach((p, i) => { const w = sliders[i].read(); if (w !== 0) weights[p] = w; });
        return { model: Object.keys(weights)[0] ?? policies[0], mixture: { weights } };
      };
    } else if (k === "mod") {
      const ref = select(policies, preset.reference ?? policies[0]);
      const sliders = policies.map((p) => slider(p, { min: -bound, max: bound, step: 0.05, value: 0, name: p }));
      const beta = el("input", { type: "number", min: "0", step: "0.01", placeholder: "optional" });
      const betaPrime = el("input", { type: "number", min: "0", step: "0.01", placeholder: "optional" });
      body.append(field("Reference", ref),
                  el("fieldset", {}, el("legend", { text: "Objective weights (the reference is skipped)" }),
                     ...sliders.map((s) => s.row)),
                  field("beta", beta), field("beta'", betaPrime));
      read = () => {
        const objectives = {};
        policies.forEach((p, i) => { const w = sliders[i].read(); if (w !== 0 && p !== ref.value) objectives[p] = w; });
        const mixture = { reference: ref.value, objectives };
        if (num(beta.value) !== undefined) mixture.beta = num(beta.value);
        if (num(betaPrime.value) !== undefined) mixture.beta_prime = num(betaPrime.value);
        return { model: Object.keys(objectives)[0] ?? ref.value, mixture };
      };
    } else if (k === "dera") {
      const ref = select(policies, preset.reference ?? policies[0]);
      const pol = select(policies, preset.policy ?? policies[1] ?? policies[0]);
      const beta = el("input", { type: "number", min: "0.001", step: "any", value: "0.1" });
      const bp = slider("beta' (new KL strength)", { min: 0.01, max: 2, step: 0.01, value: preset.beta_prime ?? 0.05 });
      body.append(field("Reference", ref), field("Tuned policy", pol), field("beta (trained with)", beta), bp.row);
      read = () => ({ model: pol.value, mixture: { reference: ref.value, policy: pol.value,
                                                   beta: Number(beta.value), beta_prime: bp.read() } });
    } else if (k === "proxy") {
      const base = select(policies, policies[0]);
      const tuned = select(policies, policies[1] ?? policies[0]);
      const untuned = select(policies, policies[2] ?? policies[0]);
      const alpha = slider("alpha", { min: -bound, max: bound, step: 0.05, value: 1 });
      body.append(field("Large base", base), field("Small tuned", tuned), field("Small untuned", untuned), alpha.row);
      read = () => ({ model: base.value, mixture: { proxy: { base: base.value, tuned: tuned.value,
                                                             untuned: untuned.value, alpha: alpha.read() } } });
    } else if (k === "guidance") {
      const pol = select(policies, policies[0]);
      const scale = slider("scale", { min: -bound, max: bound, step: 0.05, value: 1.5 });
      const neg = el("input", { type: "text", placeholder: "empty: the unconditional context" });
      body.append(field("Policy", pol), scale.row, field("Negative prompt", neg));
      read = () => ({ model: pol.value, mixture: { guidance: { policy: pol.value, scale: scale.read(),
                                                              negative_prompt: neg.value || null } } });
    } else if (k === "context_aware") {
      const pol = select(policies, policies[0]);
      const alpha = slider("alpha", { min: -bound, max: bound, step: 0.05, value: 0.5 });
      const drop = select(["system", "context"], "system");
      body.append(field("Policy", pol), alpha.row, field("Drop (the contrast without it)", drop));
      read = () => ({ model: pol.value, mixture: { context_aware: { policy: pol.value, alpha: alpha.read(),
                                                                   drop: drop.value } } });
    } else if (k === "arm") {
      // pi_base * prod_i pi_arm_i^(w_i / beta): the server compiles it to {base: 1, arm_i: w_i / beta}
      const base = select(policies, preset.base ?? policies[0]);
      const sliders = policies.map((p) => slider(p, { min: -bound, max: bound, step: 0.05,
                                                      value: preset.arms?.[p] ?? 0, name: p }));
      const beta = slider("beta (smaller: stronger guidance)", { min: 0.05, max: 4, step: 0.05,
                                                                 value: preset.beta ?? 1 });
      body.append(field("Base", base),
                  el("fieldset", {}, el("legend", { text: "Weight per autoregressive reward model (the base is skipped)" }),
                     ...sliders.map((s) => s.row)),
                  beta.row);
      read = () => {
        const arms = {};
        policies.forEach((p, i) => { const w = sliders[i].read(); if (w !== 0 && p !== base.value) arms[p] = w; });
        return { model: base.value, mixture: { arm: { base: base.value, arms, beta: beta.read() } } };
      };
    }
  }
  kind.addEventListener("change", build);
  build();
  return { read: () => read(), kind };
}
