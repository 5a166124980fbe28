// Neuron pages: keyboard navigation, copy buttons, strip values for the keyboard, and what is
// drawn from files the page does not repeat: the decoded token tables beyond the strongest `out`
// tokens (the reading sides among them), the activation histogram, the next tokens it pushes,
// the neighbours and the reproduce snippet (from the neuron's JSON, atlas-site.json and vocab.json), and the
// neighbours' labels (from the search index's label files). Without this script a page still
// shows what a citation needs: its label, strips, strongest `out` tokens, numbers and links, and
// it says where the rest is.
(function () {
  "use strict";

  // A link with data-key="u [" is followed when one of those keys is pressed; the pager's
  // rel=prev and rel=next links answer to k / ArrowLeft and j / ArrowRight.
  var REL_KEYS = { prev: ["k", "ArrowLeft"], next: ["j", "ArrowRight"] };

  function keysOf(link) {
    var keys = (link.getAttribute("data-key") || "").split(" ");
    return keys.concat(REL_KEYS[link.getAttribute("rel")] || []);
  }

  // "?" shows what the keys do (and Escape or "?" hides it): a box made here, since the keys
  // work only with this script; the method page lists them too.
  var HELP = [["j  \u2192", "next neuron"], ["k  \u2190", "previous neuron"], ["]", "same neuron, next layer"],
              ["[", "same neuron, previous layer"], ["u", "this layer's page"], ["?", "show or hide this help"]];
  var help = null;

  function toggleHelp(show) {
    if (!help) {
      help = document.createElement("div");
      help.id = "atlas-keys";
      help.className = "atlas-keys";
      help.setAttribute("role", "dialog");
      help.setAttribute("aria-label", "Keyboard shortcuts");
      help.hidden = true;
      var title = document.createElement("p");
      title.textContent = "Keyboard shortcuts";
      var list = document.createElement("dl");
      HELP.forEach(function (row) {
        var key = document.createElement("dt"), what = document.createElement("dd");
        key.textContent = row[0];
        what.textContent = row[1];
        list.appendChild(key);
        list.appendChild(what);
      });
      help.appendChild(title);
      help.appendChild(list);
      document.body.appendChild(help);
    }
    help.hidden = !show;
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.defaultPrevented) return;
    var target = event.target;
    if (target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT|BUTTON)$/.test(target.tagName))) return;
    if (event.key === "?" || (event.key === "Escape" && help && !help.hidden)) {
      event.preventDefault();
      toggleHelp(event.key === "?" && !(help && !help.hidden));
      return;
    }
    var links = document.querySelectorAll(".atlas-bar a[data-key], .atlas-bar a[rel]");
    for (var i = 0; i < links.length; i++) {
      if (keysOf(links[i]).indexOf(event.key) >= 0) {
        event.preventDefault();
        window.location.href = links[i].href;
        return;
      }
    }
  });

  // A <pre data-copy="LABEL"> gets a button LABEL after it (with data-copy naming the pre's id)
  // that copies its text: the async clipboard where the page is a secure context, else a
  // selection and execCommand, which file:// allows. The buttons are made here because
  // without this script they could not work.
  function copyBySelection(element) {
    var range = document.createRange();
    range.selectNodeContents(element);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    try {
      return document.execCommand("copy");
    } catch (err) {
      return false;
    }
  }

  function show(button, label, state) {
    button.textContent = label;
    button.setAttribute("data-state", state);
  }

  function addCopyButton(element) {
    var label = element.getAttribute("data-copy") || "copy";
    var button = document.createElement("button");
    button.type = "button";
    button.className = "md-button atlas-copy";
    button.textContent = label;
    button.setAttribute("data-copy", element.id);
    element.insertAdjacentElement("afterend", button);
    button.addEventListener("click", function () {
      var text = element.textContent;
      var done = function () { show(button, "copied", "copied"); };
      var fallback = function () {
        if (copyBySelection(element)) done();
        else show(button, "selected: press Ctrl+C", "selected");
      };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done, fallback);
      } else {
        fallback();
      }
      window.setTimeout(function () { show(button, label, ""); }, 4000);
    });
  }

  // Built without --site-url, the permanent URL is relative to the site, which is useless once
  // pasted: served over http(s), the page knows its own address, and the neuron's URL is its folder.
  var cited = document.getElementById("atlas-cite-url");
  if (cited && cited.tagName === "CODE" && /^https?:$/.test(window.location.protocol)) {
    cited.textContent = new URL(".", window.location.href).href;
  }

  // The BibTeX entry: atlas-site.json's, with this page's layer, neuron and permanent URL in its
  // slots (neuron_pages.BIBTEX_SLOTS).
  function drawBibtex(pre, data, entry) {
    var fill = { "<L>": String(Number(data.layer)), "<N>": String(Number(data.neuron)),
                 "<U>": cited ? cited.textContent.replace(/[{}]/g, "") : "" };
    pre.textContent = entry.replace(/<[LNU]>/g, function (slot) { return fill[slot]; });
    pre.hidden = false;
    addCopyButton(pre);
  }

  // Keyboard and screen readers: a strip's shaded tokens and their values (the titles, which
  // only a mouse shows) follow it as text, hidden until the strip has focus. Each strip is one
  // tab stop, not each token: a page has a dozen strips and a few hundred tokens.
  var strips = document.querySelectorAll("ol.atlas-strips li");
  for (var j = 0; j < strips.length; j++) {
    var shaded = strips[j].querySelectorAll("i[title]"), values = [];
    for (var k = 0; k < shaded.length; k++) values.push(shaded[k].textContent.trim() + " " + shaded[k].title);
    if (!values.length) continue;
    var list = document.createElement("small");
    list.className = "atlas-sr";
    list.textContent = " (" + values.join(", ") + ")";
    strips[j].appendChild(list);
    strips[j].tabIndex = 0;
  }

  var showToken = window.atlasText.showToken, visible = window.atlasText.visible;     // atlas-text.js
  function getJSON(url) {
    return fetch(url).then(function (r) { if (!r.ok) throw new Error(url + ": " + r.status); return r.json(); });
  }

  // Numbers as the site's Python writes them (text.fmt_act, fmt_stat: "%#.3g" and "%.3g").
  function fmtG(x, keepZeros) {
    if (x == null || x !== x) return "\u2013";
    var exp = Number(x.toExponential(2).split("e")[1]), s;
    if (exp >= -4 && exp < 3) s = x.toFixed(2 - exp);
    else s = x.toExponential(2).replace(/e([+-])(\d)$/, "e$10$2");
    if (!keepZeros) s = s.replace(/(\.\d*?)0+(?=e|$)/, "$1").replace(/\.(?=e|$)/, "");
    return s;
  }
  function fmtAct(x) { return fmtG(x, true); }
  function fmtStat(x) { return fmtG(x, false); }
  // A float column of the JSON: whole numbers of the step 10^<name>_exp (neuron_json.number).
  function column(group, name) {
    var exp = group[name + "_exp"] || 0;
    return group[name].map(function (v) { return v == null ? null : exp < 0 ? v / Math.pow(10, -exp) : v * Math.pow(10, exp); });
  }

  // The text of the file's "tokens", by place: their ids are differences from the one before,
  // their text is the site's vocab.json (neuron_json's format 6).
  function tokenNames(tokens, vocab) {
    var at = 0;
    return ((tokens && tokens.token_id_diff) || []).map(function (d) { at += d; return vocab[at]; });
  }

  // Decoded tokens: the rows a table shows (data-shown: top, bottom) of a side's decoded_tokens,
  // as the `out` side's top table is on the page (rank by CSS counter).
  function logitTable(polarity, group, names, shown) {
    var table = document.createElement("table"), head = table.insertRow(), th = document.createElement("th");
    table.className = "atlas-logits";
    th.textContent = polarity;
    if (group.token.length > shown) {
      var small = document.createElement("small");
      small.textContent = shown + " of " + group.token.length;
      th.append(" ", small);
    }
    var th2 = document.createElement("th");
    th2.textContent = "logit";
    head.append(th, th2);
    var scale = Math.pow(10, group.logit_exp || 0);
    for (var r = 0; r < Math.min(shown, group.token.length); r++) {
      var row = table.insertRow(), logit = group.logit[r];
      row.insertCell().textContent = showToken(names[group.token[r]]);
      row.insertCell().textContent = logit == null ? "\u2013" : (logit * scale).toFixed(2);
    }
    return table;
  }
  // A side's stats line (its direction's norm and the moments of its logits over the vocabulary),
  // from the JSON's neurons row.
  function statsLine(row, side) {
    var p = document.createElement("p"), v = function (stat) { return fmtStat(row[side + "_" + stat]); };
    p.className = "atlas-stats";
    p.textContent = "\u2016v\u2016 " + v("norm") + " \u00b7 logits: mean " + v("logit_mean") + ", std " + v("logit_std") +
                    ", skew " + v("logit_skew") + ", kurtosis " + v("logit_kurtosis");
    return p;
  }
  function sideTables(parent, side, shown, names) {
    ["top", "bottom"].forEach(function (polarity, i) {
      if (side[polarity] && shown[i] > 0) parent.appendChild(logitTable(polarity, side[polarity], names, shown[i]));
    });
  }
  // What the HTML leaves out of the decoded sides (atlas-site.json's `sides`: each side's title and
  // the rows it shows, in the store's order): the `out` side's stats line and bottom table, and the reading sides
  // the JSON has (in, gate), folded, each a section of its heading, stats line and tables.
  function drawDecoded(data, names, sides) {
    var decoded = data.decoded_tokens || {}, out = document.querySelector("[data-draw=out]");
    var reads = document.querySelector("[data-draw=reads]"), read = [];
    sides.forEach(function (s) {
      if (!decoded[s.side]) return;
      if (s.side === "out") {
        if (out) {
          out.parentNode.insertBefore(statsLine(data.neurons || {}, "out"), out.parentNode.querySelector("table"));
          sideTables(out, decoded.out, s.shown, names);
        }
        return;
      }
      var section = document.createElement("section"), h2 = document.createElement("h2"), small = document.createElement("small");
      section.id = s.side;
      small.textContent = s.title;
      h2.append(s.side + " ", small);
      section.append(h2, statsLine(data.neurons || {}, s.side));
      sideTables(section, decoded[s.side], s.shown, names);
      read.push(section);
    });
    if (!reads || !read.length) return;
    var details = document.createElement("details"), summary = document.createElement("summary"), grid = document.createElement("div");
    details.className = "atlas-reads";
    summary.textContent = "What it reads: " + read.map(function (section) { return section.id; }).join(" and ");
    grid.className = "atlas-sides";
    grid.append.apply(grid, read);
    details.append(summary, grid);
    reads.appendChild(details);
  }

  // "Next tokens it pushes": the strongest few of the JSON's attributions (data-shown), each
  // <b>token</b> and its attribution, as corpus_sections.attribution_list wrote them.
  function drawAttributions(box, data, names) {
    var attr = data.attributions || {}, shown = Number(box.getAttribute("data-shown")), lines = [];
    [["supports", "up: "], ["suppresses", "down: "]].forEach(function (pair) {
      var group = attr[pair[0]], line = [pair[1]];
      if (group && group.token.length) {
        var values = column(group, "attribution");
        for (var r = 0; r < Math.min(shown, group.token.length); r++) {
          var b = document.createElement("b");
          b.textContent = showToken(names[group.token[r]]);
          if (r) line.push(" \u00b7 ");
          line.push(b, " " + fmtStat(values[r]));
        }
      }
      lines.push(line);
    });
    if (lines[0].length + lines[1].length === 2) return;
    var h3 = document.createElement("h3"), p = document.createElement("p");
    h3.textContent = "Next tokens it pushes";
    p.className = "atlas-attr";
    p.append.apply(p, lines[0]);
    p.append(document.createElement("br"));
    p.append.apply(p, lines[1]);
    box.append(h3, p);
  }

  // The clamp check's tokens that rise and fall most (data-shown of each), "<b>token</b> +1.23".
  function drawClamp(p, data, names) {
    var effects = data.clamp_effects || {}, shown = Number(p.getAttribute("data-shown"));
    ["rises", "falls"].forEach(function (direction, i) {
      var group = effects[direction] || { token: [], delta_logprob: [] }, deltas = column(group, "delta_logprob");
      if (i) p.append(document.createElement("br"));
      p.append(direction + ": ");
      for (var r = 0; r < Math.min(shown, group.token.length); r++) {
        var b = document.createElement("b"), d = deltas[r];
        b.textContent = showToken(names[group.token[r]]);
        if (r) p.append(" \u00b7 ");
        p.append(b, " " + (d == null ? "\u2013" : (d < 0 ? "" : "+") + d.toFixed(2)));
      }
    });
  }

  // The activation histogram (corpus_sections.histogram_figure is its Python twin, which the
  // tests compare it with): bars on a log scale over the bins the neuron uses (zero always
  // among them), x ticks at 0 and powers of ten. The bins' edges are the site's, in atlas-site.json.
  var HIST_W = 256, HIST_H = 48, SVG = "http://www.w3.org/2000/svg";
  function roundHalfEven(x) {
    var r = Math.round(x);
    return Math.abs(x % 1) === 0.5 && r % 2 ? r - 1 : r;
  }
  function interp(v, xs) {
    for (var i = 1; i < xs.length; i++) if (v <= xs[i]) return i - 1 + (v - xs[i - 1]) / (xs[i] - xs[i - 1]);
    return xs.length - 1;
  }
  function histogramFigure(counts, edges) {
    var used = [], zero = 0;
    counts.forEach(function (c, i) { if (c) used.push(i); });
    while (zero < edges.length && edges[zero] < 0) zero++;
    var first = Math.max(Math.min(used.length ? used[0] : zero, zero - 1, counts.length - 1), 0);
    var last = Math.min(Math.max(used.length ? used[used.length - 1] : zero, zero), counts.length - 1);
    var logs = counts.slice(first, last + 1).map(Math.log1p), top = Math.max.apply(null, logs) || 1;
    var step = HIST_W / logs.length, parts = ["M0 " + HIST_H], x = 0, prev = 0;
    logs.forEach(function (l, i) {
      var h = roundHalfEven(l / top * (HIST_H / 2)) * 2;
      if (h !== prev) {
        var at = roundHalfEven(i * step);
        parts.push("h" + (at - x) + "v" + (prev - h));
        x = at;
        prev = h;
      }
    });
    parts.push("H" + HIST_W + "V" + HIST_H + "Z");
    var bins = edges.slice(first, last + 2), tickStep = HIST_W / (bins.length - 1), ticks = [], kept = [];
    [0].concat([-2, -1, 0, 1, 2, 3].reduce(function (all, p) { return all.concat([-Math.pow(10, p), Math.pow(10, p)]); }, []))
      .forEach(function (v) {
        if (bins[0] <= v && v <= bins[bins.length - 1]) ticks.push([roundHalfEven(interp(v, bins) * tickStep), String(v)]);
      });
    ticks.sort(function (a, b) { return a[0] - b[0] || (a[1] < b[1] ? -1 : 1); });
    ticks.forEach(function (t) { if (t[1] === "0") kept.push(t); });
    ticks.forEach(function (t) {
      if (kept.every(function (k) { return Math.abs(t[0] - k[0]) >= 22; })) kept.push(t);
    });
    kept.sort(function (a, b) { return a[0] - b[0]; });
    var zeroTick = kept.filter(function (t) { return t[1] === "0"; })[0];
    return { path: parts.join(""), ticks: kept, countMax: Math.max.apply(null, counts.concat([0])), zero: zeroTick ? zeroTick[0] : null };
  }
  function svg(name, attrs, text) {
    var el = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { el.setAttribute(k, attrs[k]); });
    if (text != null) el.textContent = text;
    return el;
  }
  function drawHistogram(box, data, site) {
    var counts = ((data.histograms || {}).counts || [])[0], edges = site.histogram_edges;
    if (!counts || !counts.length) return;
    if (!edges || edges.length !== counts.length + 1) {
      edges = counts.concat([0]).map(function (_, i) { return -1 + 2 * i / counts.length; });
    }
    var h = histogramFigure(counts, edges);
    var fig = svg("svg", { "class": "atlas-hist", viewBox: "-22 -4 282 76", role: "img", "aria-label": "tokens per activation, log scale" });
    fig.append(svg("path", { d: h.path }), svg("path", { "class": "ax", d: "M0 0V48H256" }));
    if (h.zero != null) fig.append(svg("path", { "class": "z", d: "M" + h.zero + " 0V48" }));
    h.ticks.forEach(function (t) { fig.append(svg("text", { x: t[0], y: 59 }, t[1])); });
    fig.append(svg("text", { "class": "y", x: -2, y: 6 }, h.countMax.toLocaleString("en-US")),
               svg("text", { x: 128, y: 70 }, "activation"),
               svg("text", { transform: "rotate(-90)", x: -24, y: -14 }, "tokens (log)"));
    box.appendChild(fig);
  }

  // The reproduce section: where what every page shares is (the home page), and a snippet that
  // reads the same rows from the store, for this page's layer and neuron.
  function drawQuery(section, data, reproduce, home) {
    var h2 = document.createElement("h2"), p = document.createElement("p"), link = document.createElement("a");
    var pre = document.createElement("pre"), tables = reproduce.tables.map(function (t) { return '"' + t + '"'; }).join(", ");
    h2.textContent = "Reproduce";
    p.className = "atlas-stats";
    link.setAttribute("href", home);
    link.textContent = "the home page";
    p.append("The model, its weights' hash, the corpus and the versions are on ", link, ".");
    pre.id = "atlas-query";
    pre.setAttribute("data-copy", "copy");
    pre.textContent = "import duckdb  # the same rows, from atlas.duckdb" + (reproduce.exports ? " (in exports/ on this site)" : "") +
      '\ncon = duckdb.connect("atlas.duckdb", read_only=True)\nfor table in (' + tables + (reproduce.tables.length === 1 ? "," : "") +
      '):\n    con.sql(f"SELECT * FROM {table} WHERE layer = ' + Number(data.layer) + " AND neuron = " + Number(data.neuron) +
      ' ORDER BY ALL").show(max_rows=100)\n';
    section.append(h2, p, pre);
    addCopyButton(pre);
  }

  // The neighbours by cosine of `out` directions, linked as the site links neuron pages, each
  // cosine with the decimals the JSON keeps (3 on most neurons: rounding them again to a fixed
  // number would round twice), and then their labels, from the label files of the neurons listed
  // (<index>labels/<layer>/<chunk>.json).
  function drawNeighbours(section, data, index) {
    var h2 = document.createElement("h2"), small = document.createElement("small"), code = document.createElement("code");
    var list = document.createElement("ol");
    code.textContent = "out";
    small.append("by cosine of ", code, " directions");
    h2.append("Neighbours ", small);
    list.className = "atlas-nb";
    section.append(h2, list);
    var nb = data.neighbours || { nb_layer: [], nb_neuron: [], cosine: [] }, cosines = column(nb, "cosine"), items = [];
    var decimals = Math.max(0, -(nb.cosine_exp || 0));
    for (var r = 0; r < nb.nb_layer.length; r++) {
      var li = document.createElement("li"), a = document.createElement("a"), layer = Number(nb.nb_layer[r]), n = Number(nb.nb_neuron[r]);
      a.setAttribute("href", "../../" + layer + "/" + n + "/");
      a.textContent = "L" + layer + "/N" + n;
      li.append(a, " " + (cosines[r] == null ? "\u2013" : cosines[r].toFixed(decimals)));
      list.appendChild(li);
      items.push([li, layer, n]);
    }
    getJSON(index + "meta.json").then(function (meta) {
      var chunk = meta.label_chunk, files = [];
      if (!chunk) throw new Error("no label chunks");
      items.forEach(function (item) {
        item.push(item[1] + "/" + Math.floor(item[2] / chunk));
        if (files.indexOf(item[3]) < 0) files.push(item[3]);
      });
      return Promise.all(files.map(function (f) { return getJSON(index + "labels/" + f + ".json"); })).then(function (lists) {
        items.forEach(function (item) {
          var label = visible(lists[files.indexOf(item[3])][item[2] % chunk]);
          if (label) item[0].append(" " + label);
        });
        list.setAttribute("data-state", "labelled");
      });
    }).catch(function () { list.setAttribute("data-state", "unlabelled"); });
  }

  // One fetch of the neuron's JSON (the page's "data (JSON)" link) draws all of the above, with
  // what every page shares from atlas-site.json (without it, what that file describes is missing:
  // the decoded tables, the histogram and the snippet, not the rest) and the token text of
  // vocab.json (one file for the whole site, which the browser keeps after the first page).
  var jsonLink = document.getElementById("atlas-json"), home = document.querySelector(".atlas-bar__home").getAttribute("href");
  var drawn = document.querySelectorAll("[data-draw]");
  if (jsonLink && drawn.length) {
    Promise.all([getJSON(jsonLink.getAttribute("href")),
                 getJSON(home + "atlas-site.json").catch(function () { return null; }),
                 getJSON(home + "vocab.json")]).then(function (got) {
      var data = got[0], site = got[1] || {}, names = tokenNames(data.tokens, got[2].token);
      var find = function (what) { return document.querySelector("[data-draw=" + what + "]"); };
      if (site.sides) drawDecoded(data, names, site.sides);
      if (find("attributions")) drawAttributions(find("attributions"), data, names);
      if (find("clamp")) drawClamp(find("clamp"), data, names);
      if (find("histogram") && got[1]) drawHistogram(find("histogram"), data, site);
      if (find("query") && site.reproduce) drawQuery(find("query"), data, site.reproduce, home);
      if (find("bibtex") && site.bibtex) drawBibtex(find("bibtex"), data, site.bibtex);
      if (find("neighbours")) drawNeighbours(find("neighbours"), data, home + "search/idx/");
      drawn.forEach(function (el) { el.setAttribute("data-state", "drawn"); });      // the neighbours' labels come later
    }).catch(function (err) {
      var p = document.createElement("p");
      p.className = "atlas-stats";
      p.textContent = "Part of this page could not be loaded (" + err.message + "); it is in the JSON.";
      drawn[0].parentNode.insertBefore(p, drawn[0]);
      drawn.forEach(function (el) { el.setAttribute("data-state", "failed"); });
    });
  }

  var blocks = document.querySelectorAll("pre[data-copy][id]:not([data-draw])");     // drawn ones get theirs when drawn
  for (var i = 0; i < blocks.length; i++) addCopyButton(blocks[i]);
})();
