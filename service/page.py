"""The page at ``/``: drop or pick an image (or paste a URL), see its nearest index images with
their distances. Plain HTML and a few lines of JavaScript, no build step, nothing fetched from
elsewhere."""

from __future__ import annotations

TILE = 288  # pixels of a result's thumbnail: 144 CSS pixels, sharp on 2x screens

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>image-search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
  #drop { border: 2px dashed #888; border-radius: 8px; padding: 2rem; text-align: center;
          cursor: pointer; }
  #drop.over { background: #eef; border-color: #44c; }
  #query img { max-width: 192px; max-height: 192px; }
  #results { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 1rem; }
  figure { margin: 0; width: 144px; font-size: 12px; }
  figure img { width: 144px; height: 144px; object-fit: cover; background: #ddd; }
  figcaption { overflow-wrap: anywhere; }
  #error { color: #b00; white-space: pre-wrap; }
  #status { color: #555; }
</style>
</head>
<body>
<h1>image-search</h1>
<p id="index">Loading the index description&hellip;</p>
<div id="drop" data-testid="drop">
  Drop an image here, or <label><u>pick one</u>
  <input id="file" data-testid="file" type="file" accept="image/*" hidden></label>
</div>
<p>
  <label>or an image URL <input id="url" type="url" size="50"
    placeholder="https://example.com/photo.jpg"></label>
  <button id="go-url">Search</button>
  <label>neighbours <input id="k" type="number" min="1" max="MAX_K" value="10"></label>
</p>
<div id="query"></div>
<p id="status" data-testid="status"></p>
<p id="error" data-testid="error"></p>
<div id="results" data-testid="results"></div>
<script>
const $ = (id) => document.getElementById(id);
const TILE = TILE_SIZE;

async function describe() {
  try {
    const h = await (await fetch("/healthz")).json();
    const weights = h.weights === "none" ? "random" : h.weights;
    $("index").textContent = `Index: ${h.images} images, ResNet50 (${weights} weights), ` +
      `input ${h.input_size}px` + (h.problem ? ` (note: ${h.problem})` : "");
  } catch (e) { $("index").textContent = "The service does not answer."; }
}

function show(answer) {
  const box = $("results");
  box.replaceChildren();
  for (const n of answer.neighbours) {
    const fig = document.createElement("figure");
    fig.className = "result";
    const img = document.createElement("img");
    img.src = `${n.url}?size=${TILE}`;  // a thumbnail, not the original
    img.alt = `image ${n.image_id}`;
    const cap = document.createElement("figcaption");
    cap.textContent = `#${n.rank}  distance ${n.distance.toFixed(4)}  id ${n.image_id}` +
      (n.label ? `  (${n.label})` : "") + `\\n${n.uri}`;
    fig.append(img, cap);
    box.append(fig);
  }
  const t = answer.timings_ms;
  $("status").textContent = `${answer.neighbours.length} neighbours in ${t.total} ms ` +
    `(embed ${t.embed} ms, search ${t.search} ms).`;
}

async function ask(body, headers) {
  $("error").textContent = "";
  $("status").textContent = "Searching\u2026";
  $("results").replaceChildren();
  const k = encodeURIComponent($("k").value || "10");
  try {
    const resp = await fetch(`/search?k=${k}`, { method: "POST", body, headers });
    const answer = await resp.json();
    if (!resp.ok) throw new Error(answer.detail || `HTTP ${resp.status}`);
    show(answer);
  } catch (e) {
    $("status").textContent = "";
    $("query").replaceChildren();  // a refused upload leaves no broken preview behind
    $("error").textContent = String(e.message || e);
  }
}

function searchFile(file) {
  const preview = document.createElement("img");
  preview.alt = "query";
  preview.addEventListener("error", () => preview.remove());  // not an image the browser shows
  preview.src = URL.createObjectURL(file);
  $("query").replaceChildren(preview);
  const form = new FormData();
  form.append("image", file);
  ask(form, {});
}

const drop = $("drop");
drop.addEventListener("click", (e) => { if (e.target === drop) $("file").click(); });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) searchFile(e.dataTransfer.files[0]);
});
$("file").addEventListener("change", () => {
  if ($("file").files.length) searchFile($("file").files[0]);
});
$("go-url").addEventListener("click", () => {
  $("query").replaceChildren();
  ask(JSON.stringify({ url: $("url").value }), { "Content-Type": "application/json" });
});
describe();
</script>
</body>
</html>
"""


def page(max_k: int) -> str:
    """The page, its neighbours field bounded by the service's ``max_k``."""
    return _PAGE.replace("MAX_K", str(max_k)).replace("TILE_SIZE", str(TILE))
