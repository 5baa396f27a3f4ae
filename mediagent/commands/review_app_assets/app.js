// The review page. Every text that comes from a model, the data or the server is put into
// the page with textContent (or option.text), never innerHTML: it shows as typed, tags and all.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], item: null, reviewer: "", pair: null };

function setStatus(el, text, isError) {
  el.textContent = text || "";
  el.classList.toggle("error", Boolean(isError));
}

function errorText(data, status) {
  if (data.error) return data.error;
  if (Array.isArray(data.detail)) {  // FastAPI's validation errors
    return data.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  }
  return `HTTP ${status}`;
}

async function postJSON(url, body) {
  const resp = await fetch(url, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    throw new Error(errorText(data, resp.status));
  }
  return data;
}

function fillSelect(select, names, chosen, allowNone) {
  select.replaceChildren();
  if (allowNone) select.add(new Option("(none)", ""));
  for (const name of names) select.add(new Option(name, name));
  select.value = chosen || "";
}

function showTab(name) {
  for (const tab of ["arena", "review"]) {
    $(tab).hidden = tab !== name;
    $(`tab-${tab}`).classList.toggle("active", tab === name);
  }
}

async function loadConfig() {
  const resp = await fetch("/api/config");
  const cfg = await resp.json();
  if (!resp.ok) {
    setStatus($("server-status"), cfg.error || `HTTP ${resp.status}`, true);
    return;
  }
  state.models = cfg.models;
  setStatus($("server-status"), `${cfg.models.length} models served; ${cfg.review_questions} review questions`);
  for (let i = 1; i <= 4; i++) {
    fillSelect($(`arena-model-${i}`), cfg.models, cfg.models[i - 1] && i <= 2 ? cfg.models[i - 1] : "", i > 2);
  }
  $("arena-max-tokens").value = cfg.arena_defaults.max_tokens;
  $("arena-temperature").value = cfg.arena_defaults.temperature;
  const saved = JSON.parse(localStorage.getItem("review-pair") || "[]");
  fillSelect($("review-model-1"), cfg.models, cfg.models.includes(saved[0]) ? saved[0] : cfg.models[0], false);
  fillSelect($("review-model-2"), cfg.models, cfg.models.includes(saved[1]) ? saved[1] : cfg.models[1], false);
  $("reviewer").value = localStorage.getItem("reviewer") || "";
}

// ---------------------------------------------------------------- arena
// Every chosen model is asked at once: the panes stream side by side, each token by token.

async function streamInto(model, question, maxTokens, temperature, pane, out) {
  const resp = await fetch("/api/arena", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model, question, max_tokens: maxTokens, temperature }),
  });
  if (!resp.ok) {
    const data = await resp.json().catch(() => ({}));
    throw new Error(errorText(data, resp.status));
  }
  // One JSON object per line: {"text": piece} while the answer streams, {"error": why} if it broke.
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let chunks = 0;
  let pieces = 0;
  const take = (line) => {
    if (!line.trim()) return;
    const msg = JSON.parse(line);
    if (msg.error) throw new Error(msg.error);
    out.textContent += msg.text;
    // when the first and the last piece arrived: the arena test checks the panes overlap
    if (!pieces) pane.dataset.first = String(performance.now());
    pane.dataset.last = String(performance.now());
    pieces += 1;
    pane.dataset.pieces = String(pieces);  // streamed pieces of the answer, each shown as it came
  };
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split("\n");
    buffer = lines.pop();
    lines.forEach(take);
    chunks += 1;
    pane.dataset.chunks = String(chunks);  // network reads (a busy machine may coalesce pieces)
  }
  take(buffer + decoder.decode());
}

async function ask() {
  const question = $("arena-question").value.trim();
  const chosen = [1, 2, 3, 4].map((i) => $(`arena-model-${i}`).value).filter(Boolean);
  const unique = [...new Set(chosen)];
  if (!question) return setStatus($("arena-status"), "Type a question first.", true);
  if (unique.length < 2) return setStatus($("arena-status"), "Choose at least two different models.", true);
  const maxTokens = Number($("arena-max-tokens").value) || 512;
  const temperature = Number($("arena-temperature").value) || 0;
  const box = $("arena-answers");
  box.replaceChildren();
  setStatus($("arena-status"), "Answering...");
  $("arena-ask").disabled = true;
  const jobs = unique.map((model) => {
    const pane = document.createElement("div");
    pane.className = "pane";
    pane.dataset.model = model;
    pane.dataset.done = "0";
    const title = document.createElement("h3");
    title.textContent = model;
    const out = document.createElement("pre");
    out.className = "text answer";
    pane.append(title, out);
    box.append(pane);
    return streamInto(model, question, maxTokens, temperature, pane, out)
      .catch((err) => { out.textContent += `\n[error: ${err.message}]`; pane.dataset.error = "1"; })
      .finally(() => { pane.dataset.done = "1"; });
  });
  await Promise.all(jobs);
  $("arena-ask").disabled = false;
  setStatus($("arena-status"), "Done.");
}

// ---------------------------------------------------------------- blind review

function showItem(item) {
  state.item = item;
  const box = $("review-item");
  if (item.done) {
    box.hidden = true;
    setStatus($("review-status"), `All ${item.total} questions judged for this pair. Thank you.`);
    return;
  }
  $("review-progress").textContent = `Question ${item.position} of ${item.total}`;
  $("review-question").textContent = item.question;
  $("review-reference").textContent = item.reference;
  $("answer-a").textContent = item.answer_a;
  $("answer-b").textContent = item.answer_b;
  $("unsafe-a").checked = false;
  $("unsafe-b").checked = false;
  $("review-comment").value = "";
  box.dataset.questionId = item.question_id;
  box.hidden = false;
  setStatus($("review-status"), "");
}

async function startReview() {
  const reviewer = $("reviewer").value.trim();
  const pair = [$("review-model-1").value, $("review-model-2").value];
  if (!reviewer) return setStatus($("review-status"), "Enter your name first.", true);
  if (!pair[0] || pair[0] === pair[1]) return setStatus($("review-status"), "Choose two different models.", true);
  localStorage.setItem("reviewer", reviewer);
  localStorage.setItem("review-pair", JSON.stringify(pair));
  state.reviewer = reviewer;
  state.pair = pair;
  // the name is entered once; reload the page to change it
  for (const id of ["reviewer", "review-model-1", "review-model-2", "review-start"]) $(id).disabled = true;
  setStatus($("review-status"), "Loading answers...");
  try {
    showItem(await postJSON("/api/review/next", { reviewer, models: pair }));
  } catch (err) {
    setStatus($("review-status"), err.message, true);
    for (const id of ["reviewer", "review-model-1", "review-model-2", "review-start"]) $(id).disabled = false;
  }
}

async function judge(choice) {
  if (!state.item || state.item.done) return;
  const unsafe = [];
  if ($("unsafe-a").checked) unsafe.push("A");
  if ($("unsafe-b").checked) unsafe.push("B");
  const buttons = ["choose-a", "choose-b", "choose-tie"].map($);
  buttons.forEach((b) => { b.disabled = true; });
  setStatus($("review-status"), "Saving...");
  try {
    const result = await postJSON("/api/review/judge", {
      reviewer: state.reviewer, models: state.pair, question_id: state.item.question_id, choice, unsafe,
      comment: $("review-comment").value,
    });
    showItem(result.next);
    if (!result.next.done) setStatus($("review-status"), `Saved your judgment of question ${result.recorded}.`);
  } catch (err) {
    setStatus($("review-status"), err.message, true);
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("tab-arena").addEventListener("click", () => showTab("arena"));
  $("tab-review").addEventListener("click", () => showTab("review"));
  $("arena-ask").addEventListener("click", ask);
  $("review-start").addEventListener("click", startReview);
  $("choose-a").addEventListener("click", () => judge("A"));
  $("choose-b").addEventListener("click", () => judge("B"));
  $("choose-tie").addEventListener("click", () => judge("tie"));
  loadConfig().catch((err) => setStatus($("server-status"), err.message, true));
});
