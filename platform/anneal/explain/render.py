"""An attention map drawn for people: a PNG heatmap and one self-contained HTML page.

The PNG has two panels: answer tokens × prompt tokens (averaged over the layers), and layers ×
prompt tokens (averaged over the answer tokens); numeric prompt tokens are labelled in red.
The HTML page shows the prompt's tokens coloured by the attention they got — from all answer
tokens, or from the one under the pointer or clicked — in the layer chosen (or the mean of all
layers), with the figures (``numberAttention``), the layers without attention that were skipped,
and the PNG inline. The default view is written into the page itself, so it shows without
JavaScript; the data for the other views is embedded as JSON (no request leaves the page).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from anneal.explain.attention import AttentionMap

PNG_NAME = "attention.png"
HTML_NAME = "attention.html"
#: Above this many weights (layers × answer × prompt tokens) the page keeps only the layers' mean.
MAX_EMBEDDED_WEIGHTS = 2_000_000
_HEAT = (198, 40, 40)  # the colour of full attention; white is none


def _label(token: str) -> str:
    """A token as a tick label: control characters escaped (no font has a glyph for them)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in token) or "∅"


def render_png(m: AttentionMap, dpi: int = 100) -> bytes:
    """The map as a picture: answer × prompt (mean over layers) above layers × prompt (mean over answer tokens)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in a server thread

    p, a, n_layers = len(m.prompt_tokens), len(m.answer_tokens), len(m.layers)
    width = min(max(8.0, 0.16 * p + 2.5), 60.0)
    rows_a, rows_l = max(a, 1), max(n_layers, 1)
    height = min(2.5 + 0.16 * (rows_a + rows_l) + 2.0, 60.0)
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[rows_a + 2, rows_l + 2])
    skipped = f"; blocks without attention, skipped: {', '.join(map(str, m.skipped_layers))}" if m.skipped_layers else ""
    na = m.number_attention
    fig.suptitle(f"attention of the answer over the prompt — numberAttention "
                 f"{'n/a' if na is None else f'{na:.3f}'} (numeric tokens: {m.number_token_share:.3f} of the prompt)"
                 f"{skipped}", fontsize=10, x=0.0, ha="left")
    labels = [_label(t) for t in m.prompt_tokens]
    panels = ((top, m.weights.mean(axis=0) if n_layers and a else None, [_label(t) for t in m.answer_tokens],
               "answer token (its query), mean over layers"),
              (bottom, m.weights.mean(axis=1) if n_layers and a else None, [f"layer {i}" for i in m.layers],
               "layer, mean over answer tokens"))
    for ax, data, ylabels, title in panels:
        ax.set_title(title, loc="left", fontsize=9)
        if data is None or data.size == 0:
            ax.text(0.5, 0.5, "no answer tokens" if not a else "no layer with attention", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
            continue
        image = ax.imshow(data, aspect="auto", cmap="Reds", vmin=0.0, interpolation="nearest")
        ax.set_xticks(range(p))
        ax.set_xticklabels(labels, rotation=90, fontsize=7, fontfamily="monospace")
        for tick, numeric in zip(ax.get_xticklabels(), m.numeric):
            if numeric:
                tick.set_color("#c62828")
                tick.set_fontweight("bold")
        ax.set_yticks(range(len(ylabels)))
        ax.set_yticklabels(ylabels, fontsize=7, fontfamily="monospace")
        fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _background(weight: float, top: float) -> str:
    share = 0.0 if top <= 0 else min(max(weight / top, 0.0), 1.0)
    r, g, b = (round(255 + (c - 255) * share) for c in _HEAT)
    return f"rgb({r},{g},{b})"


def _tokens_html(tokens: list[str], weights: np.ndarray | None, numeric: list[bool] | None, cls: str) -> str:
    spans = []
    top = float(weights.max()) if weights is not None and weights.size else 0.0
    for k, t in enumerate(tokens):
        attrs = f' data-i="{k}"'
        classes = [cls] + (["num"] if numeric and numeric[k] else [])
        if weights is not None:
            w = float(weights[k])
            share = 0.0 if top <= 0 else w / top
            colour = "#fff" if share > 0.6 else "#212121"
            attrs += f' title="{w:.4f}" style="background:{_background(w, top)};color:{colour}"'
        text = html.escape(t).replace("\n", "↵<br>")
        spans.append(f'<span class="{" ".join(classes)}"{attrs}>{text or "∅"}</span>')
    return "".join(spans)


_SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById('attention-data').textContent);
  var heat = data.heat, layerSel = document.getElementById('layer');
  var prompt = document.querySelectorAll('#prompt span'), answer = document.querySelectorAll('#answer span');
  var pinned = null;
  function rows() {  // [answer][prompt] for the chosen layer, or the layers' mean
    var v = layerSel.value;
    return v === 'mean' ? data.mean : data.layers[parseInt(v, 10)];
  }
  function show(i) {
    var r = rows(), w = [];
    for (var j = 0; j < data.prompt; j++) {
      var s = 0;
      if (i === null) { for (var k = 0; k < r.length; k++) s += r[k][j]; s /= Math.max(r.length, 1); }
      else s = r[i][j];
      w.push(s);
    }
    var top = Math.max.apply(null, w.concat([0]));
    for (var j = 0; j < prompt.length; j++) {
      var share = top > 0 ? w[j] / top : 0;
      var c = heat.map(function (x) { return Math.round(255 + (x - 255) * share); });
      prompt[j].style.background = 'rgb(' + c.join(',') + ')';
      prompt[j].style.color = share > 0.6 ? '#fff' : '#212121';
      prompt[j].title = w[j].toFixed(4);
    }
    for (var k = 0; k < answer.length; k++) answer[k].classList.toggle('sel', i === k);
    document.getElementById('showing').textContent = (i === null ? 'all answer tokens' : 'answer token ' + i +
      ' (' + JSON.stringify(answer[i].textContent) + ')') + ', ' + layerSel.options[layerSel.selectedIndex].text;
  }
  for (var k = 0; k < answer.length; k++) (function (k) {
    answer[k].addEventListener('mouseenter', function () { show(k); });
    answer[k].addEventListener('mouseleave', function () { show(pinned); });
    answer[k].addEventListener('click', function () { pinned = pinned === k ? null : k; show(pinned); });
  })(k);
  layerSel.addEventListener('change', function () { show(pinned); });
  document.getElementById('all').addEventListener('click', function () { pinned = null; show(null); });
})();
"""


def render_html(m: AttentionMap, png: bytes | None = None) -> str:
    """One self-contained page: the figures, the prompt coloured by attention (interactive), the PNG."""
    esc = html.escape
    p, a, n_layers = len(m.prompt_tokens), len(m.answer_tokens), len(m.layers)
    has_data = bool(n_layers and a)
    mean = m.weights.mean(axis=0) if has_data else np.zeros((a, p), dtype=np.float32)  # [A, P]
    default = mean.mean(axis=0) if a else np.zeros(p, dtype=np.float32)
    per_layer = has_data and m.weights.size <= MAX_EMBEDDED_WEIGHTS
    payload = {"prompt": p, "heat": list(_HEAT), "mean": np.round(mean, 5).tolist(),
               "layers": np.round(m.weights, 5).tolist() if per_layer else []}
    data = json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")
    options = '<option value="mean">mean of all layers</option>' + (
        "".join(f'<option value="{k}">layer {i}</option>' for k, i in enumerate(m.layers)) if per_layer else "")
    per_layer_na = m.layer_number_attention()
    layer_rows = "".join(f"<tr><td>{i}</td><td>{_cell(v)}</td></tr>" for i, v in zip(m.layers, per_layer_na))
    layer_rows += "".join(f'<tr class="skip"><td>{i}</td><td>no attention (skipped)</td></tr>'
                          for i in m.skipped_layers)
    summary = [("model", m.model or "—"), ("question", m.question), ("answer", m.answer or "(empty)")]
    if m.correct is not None:
        summary.append(("correct", "yes" if m.correct else "no"))
    summary += [("numberAttention", f"{_cell(m.number_attention)} of the answer's attention on the prompt falls on "
                 f"numeric tokens ({m.number_token_share:.3f} of the prompt's tokens are numeric)"),
                ("layers shown", ", ".join(map(str, m.layers)) or "none"),
                ("layers skipped", (", ".join(map(str, m.skipped_layers)) + " (no attention: removed blocks)")
                 if m.skipped_layers else "none"),
                ("tokens", f"{p} prompt, {a} answer")]
    note = "" if per_layer or not has_data else (
        f"<p class='note'>{m.weights.size} weights: only the mean of the layers is kept in this page.</p>")
    image = "" if png is None else (
        f'<h2>Heatmap</h2><img alt="attention heatmap: answer and layers over the prompt tokens" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>attention map: {esc(m.question[:80])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #212121; }}
table {{ border-collapse: collapse; margin: 0.75rem 0; font-size: 0.85rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; vertical-align: top; }}
th {{ background: #eceff1; }} tr.skip td {{ color: #757575; font-style: italic; }}
.tokens {{ font-family: ui-monospace, monospace; font-size: 0.95rem; line-height: 1.9; white-space: pre-wrap;
  border: 1px solid #ddd; padding: 0.5rem; }}
.tokens span {{ border-radius: 3px; padding: 1px 0; }}
span.num {{ font-weight: bold; text-decoration: underline; }}
#answer span {{ cursor: pointer; background: #e3f2fd; margin-right: 2px; }}
#answer span.sel {{ outline: 2px solid #1565c0; }}
.note {{ color: #616161; font-size: 0.85rem; }} img {{ max-width: 100%; }}
</style></head>
<body>
<h1>Where the answer looked</h1>
<table>{"".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary)}</table>
<p>Layer: <select id="layer">{options}</select> <button id="all" type="button">all answer tokens</button>
 — showing <b id="showing">all answer tokens, mean of all layers</b></p>
<h2>Prompt</h2>
<p class="note">Each token's colour: the attention it got (head-averaged, relative to the most attended token).
Numeric tokens are bold and underlined. Point at or click an answer token to see where it looked.</p>
<div id="prompt" class="tokens">{_tokens_html(m.prompt_tokens, default, m.numeric, "p")}</div>
<h2>Answer</h2>
<div id="answer" class="tokens">{_tokens_html(m.answer_tokens, None, None, "a")}</div>
{note}
<h2>numberAttention per layer</h2>
<table><tr><th>layer</th><th>numberAttention</th></tr>{layer_rows}</table>
{image}
<script type="application/json" id="attention-data">{data}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_map(m: AttentionMap, out_dir: Path, stem: str = "attention") -> tuple[Path, Path, Path]:
    """Write ``<stem>.png``, ``<stem>.html`` and ``<stem>.json`` (the figures) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = render_png(m)
    png_path, html_path, json_path = out_dir / f"{stem}.png", out_dir / f"{stem}.html", out_dir / f"{stem}.json"
    png_path.write_bytes(png)
    html_path.write_text(render_html(m, png), encoding="utf-8")
    json_path.write_text(json.dumps({**m.summary(), "layerNumberAttention": m.layer_number_attention()}, indent=2))
    return png_path, html_path, json_path


__all__ = ["HTML_NAME", "PNG_NAME", "render_html", "render_png", "write_map"]
