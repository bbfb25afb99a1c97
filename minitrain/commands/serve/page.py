"""The page at ``GET /``: pick or drop an image, see the model's five most probable classes as
bars. One self-contained HTML file (no script or style from elsewhere) that calls ``/predict``
with the image's raw bytes, as any client would."""

from __future__ import annotations

import html
from typing import Any

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>minitrain serve: __TITLE__</title>
<style>
body { font: 15px/1.4 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.3rem; margin-bottom: .2rem; } .muted { color: #666; font-size: .9rem; }
#drop { display: block; border: 2px dashed #999; border-radius: 8px; padding: 1.5rem; text-align: center;
        margin: 1rem 0;
        cursor: pointer; } #drop.over { border-color: #1967d2; background: #eef4fd; }
#key { width: 20rem; } #preview { max-width: 160px; max-height: 160px; image-rendering: pixelated; display: none; }
#result { display: flex; gap: 1.5rem; align-items: flex-start; } #bars { flex: 1; }
.bar { display: grid; grid-template-columns: 8rem 1fr 4rem; gap: .5rem; align-items: center; margin: .3rem 0; }
.track { background: #eee; border-radius: 3px; height: 1.1rem; } .fill { background: #1967d2; height: 100%;
         border-radius: 3px; } .bar:first-child .fill { background: #0b8043; } .p { text-align: right; }
#status.error { color: #b00020; }
</style></head>
<body>
<h1>__TITLE__</h1>
<div class="muted">__SUMMARY__</div>
<p id="keyrow" __KEY_HIDDEN__><label>API key <input id="key" type="password" autocomplete="off"></label></p>
<label id="drop">Drop an image here, or click to pick one
  <input id="file" type="file" accept="image/*" hidden></label>
<div id="status" class="muted" role="status">ready</div>
<div id="result"><img id="preview" alt="the image sent"><div id="bars" aria-live="polite"></div></div>
<script>
(function () {
  var drop = document.getElementById("drop"), input = document.getElementById("file");
  var status = document.getElementById("status"), bars = document.getElementById("bars");
  var preview = document.getElementById("preview");
  function say(text, error) { status.textContent = text; status.className = error ? "error" : "muted"; }
  function show(top) {
    bars.textContent = "";
    top.forEach(function (t) {
      var row = document.createElement("div"), name = document.createElement("span"),
          track = document.createElement("div"), fill = document.createElement("div"),
          p = document.createElement("span");
      row.className = "bar"; name.className = "name"; track.className = "track"; fill.className = "fill";
      p.className = "p"; name.textContent = t["class"]; p.textContent = (100 * t.probability).toFixed(1) + "%";
      fill.style.width = (100 * t.probability).toFixed(1) + "%";
      track.appendChild(fill); row.appendChild(name); row.appendChild(track); row.appendChild(p);
      bars.appendChild(row);
    });
  }
  function classify(file) {
    if (!file) { return; }
    preview.src = URL.createObjectURL(file); preview.style.display = "block";
    say("classifying " + file.name + " ...");
    var headers = {"Content-Type": file.type || "application/octet-stream"};
    var key = document.getElementById("key").value;
    if (key) { headers["Authorization"] = "Bearer " + key; }
    fetch("predict?top_k=5", {method: "POST", headers: headers, body: file})
      .then(function (r) { return r.json().then(function (body) { return [r, body]; }); })
      .then(function (answer) {
        if (!answer[0].ok) {
          bars.textContent = ""; say(answer[1].error || ("error " + answer[0].status), true); return;
        }
        show(answer[1].predictions[0].top); say(file.name + ": " + answer[1].predictions[0].top[0]["class"]);
      })
      .catch(function (e) { say("the server did not answer: " + e, true); });
  }
  input.addEventListener("change", function () { classify(input.files[0]); });
  ["dragenter", "dragover"].forEach(function (n) {
    drop.addEventListener(n, function (e) { e.preventDefault(); drop.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (n) {
    drop.addEventListener(n, function (e) { e.preventDefault(); drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (e) { classify(e.dataTransfer.files[0]); });
})();
</script>
</body></html>
"""


def html_page(metadata: dict[str, Any], needs_key: bool) -> str:
    names = metadata["class_names"]
    height, width = metadata["input_size"]
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    summary = f"{len(names)} classes: {shown}. Images are fitted to {width}×{height} pixels."
    return (
        PAGE.replace("__TITLE__", html.escape(f"Classify an image ({metadata.get('format', 'model')} model)"))
        .replace("__SUMMARY__", html.escape(summary))
        .replace("__KEY_HIDDEN__", "" if needs_key else "hidden")
    )
