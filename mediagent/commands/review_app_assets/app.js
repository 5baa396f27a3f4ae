// The review page. Every text that comes from a model, the data or the server is put into
// the page with textContent (or option.text), never innerHTML: it shows as typed, tags and all.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], item: null, reviewer: "", pair: null };

// ---------------------------------------------------------------- languages
// messages.json holds one table per language. The server picks the page's language (the
// reviewer's saved choice, else Accept-Language) and writes it into <html lang>; the switch
// saves a new choice in a cookie so that the server picks it on the next load.
// Every URL here is relative (no leading /) and the cookie has the page's own path: behind a
// reverse proxy that serves the app under a prefix (PAI-DSW's /<instance>/proxy/7860/) the
// requests stay under that prefix and the choice stays with this app, not the whole gateway.

const LANG_COOKIE = "mediagent_lang";
let tables = {};
let messages = {};

function t(key, values = {}) {
  const text = messages[key] ?? key;  // a missing key shows itself; tests keep the tables complete
  return text.replace(/\{(\w+)\}/g, (whole, name) => (name in values ? String(values[name]) : whole));
}

// An element's text is kept as its message key and values (data-i18n, data-i18n-values), so
// that a language switch can render it again, statuses and errors included.
function setText(el, key, values = {}) {
  if (!key) {
    delete el.dataset.i18n;
    el.textContent = "";
    return;
  }
  el.dataset.i18n = key;
  el.dataset.i18nValues = JSON.stringify(values);
  el.textContent = t(key, values);
}

function translate() {
  for (const el of document.querySelectorAll("[data-i18n]")) {
    el.textContent = t(el.dataset.i18n, JSON.parse(el.dataset.i18nValues || "{}"));
  }
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) {
    el.placeholder = t(el.dataset.i18nPlaceholder);
  }
  for (const el of document.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
  // the note CSS shows in an empty answer (app.css: pre.answer:empty::before)
  document.documentElement.style.setProperty("--empty-answer", JSON.stringify(t("answer.empty")));
}

function applyLanguage(lang) {
  if (!(lang in tables)) lang = "en";
  messages = tables[lang];
  document.documentElement.lang = lang;
  for (const button of document.querySelectorAll("[data-lang]")) {
    button.setAttribute("aria-pressed", String(button.dataset.lang === lang));
  }
  translate();
}

function chooseLanguage(lang) {
  document.cookie = `${LANG_COOKIE}=${lang}; max-age=31536000; samesite=strict`;
  applyLanguage(lang);
}

// ---------------------------------------------------------------- statuses and errors

function setStatus(el, key, values, isError) {
  setText(el, key, values);
  el.classList.toggle("error", Boolean(isError));
}

// A failure the page can name in either language: a message key and its values.
class PageError extends Error {
  constructor(key, values = {}) {
    super(key);
    this.key = key;
    this.values = values;
  }
}

// The server answers an error with a stable code (plus values) beside its English text;
// the page shows the code's message in the reviewer's language.
function responseError(data, status) {
  if (data.code) return new PageError(`error.${data.code}`, data.values || {});
  if (Array.isArray(data.detail)) {  // FastAPI's validation errors
    return new PageError("error.invalid", { fields: data.detail.map((d) => (d.loc || []).slice(1).join(".")).join(", ") });
  }
  return new PageError("error.http", { status });
}

function showError(el, err) {
  if (err instanceof PageError) return setStatus(el, err.key, err.values, true);
  if (err instanceof TypeError && /fetch|network/i.test(err.message)) return setStatus(el, "error.network", {}, true);
  return setStatus(el, "error.unexpected", { detail: err.message }, true);
}

async function postJSON(url, body) {
  const resp = await fetch(url, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw responseError(data, resp.status);
  return data;
}

function fillSelect(select, names, chosen, allowNone) {
  select.replaceChildren();
  if (allowNone) {
    const none = new Option("", "");
    setText(none, "arena.none");
    select.add(none);
  }
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
  const resp = await fetch("api/config");
  const cfg = await resp.json().catch(() => ({}));
  if (!resp.ok) throw responseError(cfg, resp.status);
  state.models = cfg.models;
  setStatus($("server-status"), "status.config", { models: cfg.models.length, questions: cfg.review_questions });
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
  const resp = await fetch("api/arena", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model, question, max_tokens: maxTokens, temperature }),
  });
  if (!resp.ok) {
    const data = await resp.json().catch(() => ({}));
    throw responseError(data, resp.status);
  }
  // One JSON object per line: {"text": piece} while the answer streams, {"error": why, "code": ...} if it broke.
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let chunks = 0;
  let pieces = 0;
  const take = (line) => {
    if (!line.trim()) return;
    const msg = JSON.parse(line);
    if (msg.error) throw responseError(msg, resp.status);
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
  if (!question) return setStatus($("arena-status"), "arena.need_question", {}, true);
  if (unique.length < 2) return setStatus($("arena-status"), "arena.need_two_models", {}, true);
  const maxTokens = Number($("arena-max-tokens").value) || 512;
  const temperature = Number($("arena-temperature").value) || 0;
  const box = $("arena-answers");
  box.replaceChildren();
  setStatus($("arena-status"), "arena.answering");
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
    const note = document.createElement("p");  // an error, apart from the model's text
    note.className = "status";
    pane.append(title, out, note);
    box.append(pane);
    return streamInto(model, question, maxTokens, temperature, pane, out)
      .catch((err) => { showError(note, err); pane.dataset.error = "1"; })
      .finally(() => { pane.dataset.done = "1"; });
  });
  await Promise.all(jobs);
  $("arena-ask").disabled = false;
  setStatus($("arena-status"), "arena.done");
}

// ---------------------------------------------------------------- blind review

function showItem(item) {
  state.item = item;
  const box = $("review-item");
  if (item.done) {
    box.hidden = true;
    setStatus($("review-status"), "review.all_done", { total: item.total });
    return;
  }
  setText($("review-progress"), "review.progress", { position: item.position, total: item.total });
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
  if (!reviewer) return setStatus($("review-status"), "review.need_name", {}, true);
  if (!pair[0] || pair[0] === pair[1]) return setStatus($("review-status"), "review.need_two_models", {}, true);
  localStorage.setItem("reviewer", reviewer);
  localStorage.setItem("review-pair", JSON.stringify(pair));
  state.reviewer = reviewer;
  state.pair = pair;
  // the name is entered once; reload the page to change it
  for (const id of ["reviewer", "review-model-1", "review-model-2", "review-start"]) $(id).disabled = true;
  setStatus($("review-status"), "review.loading");
  try {
    showItem(await postJSON("api/review/next", { reviewer, models: pair }));
  } catch (err) {
    showError($("review-status"), err);
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
  setStatus($("review-status"), "review.saving");
  try {
    const result = await postJSON("api/review/judge", {
      reviewer: state.reviewer, models: state.pair, question_id: state.item.question_id, choice, unsafe,
      comment: $("review-comment").value,
    });
    showItem(result.next);
    if (!result.next.done) setStatus($("review-status"), "review.saved", { question: result.recorded });
  } catch (err) {
    showError($("review-status"), err);
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  $("tab-arena").addEventListener("click", () => showTab("arena"));
  $("tab-review").addEventListener("click", () => showTab("review"));
  for (const button of document.querySelectorAll("[data-lang]")) {
    button.addEventListener("click", () => chooseLanguage(button.dataset.lang));
  }
  $("arena-ask").addEventListener("click", ask);
  $("review-start").addEventListener("click", startReview);
  $("choose-a").addEventListener("click", () => judge("A"));
  $("choose-b").addEventListener("click", () => judge("B"));
  $("choose-tie").addEventListener("click", () => judge("tie"));
  try {
    tables = await (await fetch("static/messages.json")).json();
    applyLanguage(document.documentElement.lang);
    await loadConfig();
  } catch (err) {
    showError($("server-status"), err);
  }
});
