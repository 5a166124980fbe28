// Neuron pages: keyboard navigation, copy buttons, strip values for the keyboard, and two things
// drawn from files the page does not repeat: the reading sides' token tables (from the neuron's
// JSON) and the neighbours' labels (from the search index's label files). Without this script a
// page still shows its label, strips, `out` tokens, numbers and links, and says where the rest is.
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
  if (cited && /^https?:$/.test(window.location.protocol)) {
    var relative = cited.textContent, absolute = new URL(".", window.location.href).href;
    var bibtex = document.getElementById("atlas-bibtex");
    cited.textContent = absolute;
    if (bibtex) bibtex.textContent = bibtex.textContent.replace("url = {" + relative + "}", "url = {" + absolute + "}");
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

  // Token and label text is untrusted: it reaches the page through textContent only, made
  // visible as the site's Python does it (text.show_token and text.visible, its twins).
  var SYMBOLS = { " ": "\u2423", "\n": "\u21b5", "\t": "\u21e5" };
  var INVISIBLE = /^[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}\p{Zs}]$/u;
  function reveal(text, symbols) {
    return Array.from(text, function (ch) {
      if (symbols[ch] !== undefined) return symbols[ch];
      return INVISIBLE.test(ch) ? "\u27e8U+" + ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0") + "\u27e9" : ch;
    }).join("");
  }
  function showToken(token) { return (token == null ? "" : reveal(token, SYMBOLS)) || "\u2205"; }
  function visible(label) { return label ? reveal(label.split(/\s+/).filter(Boolean).join(" "), { " ": " " }) : ""; }
  function getJSON(url) {
    return fetch(url).then(function (r) { if (!r.ok) throw new Error(url + ": " + r.status); return r.json(); });
  }

  // The reading sides: each side's strongest and weakest rows (data-shown) of the JSON's
  // decoded_tokens, as the `out` side's tables are on the page (rank by CSS counter).
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
  var reads = document.querySelector("details.atlas-reads[data-json]");
  if (reads) {
    getJSON(reads.getAttribute("data-json")).then(function (data) {
      var names = data.tokens ? data.tokens.token : [], decoded = data.decoded_tokens || {};
      reads.querySelectorAll("div.atlas-read[data-side]").forEach(function (div) {
        var side = decoded[div.getAttribute("data-side")] || {}, shown = div.getAttribute("data-shown").split(" ");
        ["top", "bottom"].forEach(function (polarity, i) {
          if (side[polarity]) div.appendChild(logitTable(polarity, side[polarity], names, Number(shown[i])));
        });
      });
      reads.setAttribute("data-state", "drawn");
    }).catch(function (err) {
      var p = document.createElement("p");
      p.className = "atlas-stats";
      p.textContent = "The tokens could not be loaded (" + err.message + "); they are in the JSON.";
      reads.appendChild(p);
      reads.setAttribute("data-state", "failed");
    });
  }

  // The neighbours' labels, from the label files of the neurons listed (idx/labels/<layer>/<chunk>.json).
  var neighbours = document.querySelector("ol.atlas-nb[data-index]");
  if (neighbours) {
    var index = neighbours.getAttribute("data-index");
    getJSON(index + "meta.json").then(function (meta) {
      var chunk = meta.label_chunk, items = [], files = [];
      neighbours.querySelectorAll("li > a").forEach(function (a) {
        var m = /(\d+)\/(\d+)\/$/.exec(a.getAttribute("href"));
        if (!m || !chunk) return;
        var file = m[1] + "/" + Math.floor(Number(m[2]) / chunk);
        if (files.indexOf(file) < 0) files.push(file);
        items.push([a.parentNode, file, Number(m[2]) % chunk]);
      });
      return Promise.all(files.map(function (f) { return getJSON(index + "labels/" + f + ".json"); })).then(function (lists) {
        items.forEach(function (item) {
          var label = visible(lists[files.indexOf(item[1])][item[2]]);
          if (label) item[0].append(" " + label);
        });
        neighbours.setAttribute("data-state", "labelled");
      });
    }).catch(function () { neighbours.setAttribute("data-state", "unlabelled"); });
  }

  var blocks = document.querySelectorAll("pre[data-copy][id]");
  for (var i = 0; i < blocks.length; i++) addCopyButton(blocks[i]);
})();
