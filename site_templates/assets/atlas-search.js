// The search page: concept search over the sharded token index in idx/, and full-text
// (full-text search with pagefind was removed with the site budgets: see the README).
// normalise, queryTerms, shardOf and rank are twins of those in atlas/site/index_format.py and
// search_query.py: the command line and this page must give the same ranking. Every string from the index is
// untrusted (token text, labels) and reaches the page through textContent only.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("atlas-search-data").textContent);
  var input = document.getElementById("atlas-search-q");
  var status = document.getElementById("atlas-search-status");
  var list = document.getElementById("atlas-search-results");
  var filter = document.getElementById("atlas-search-dir");
  var SHOWN = 50;
  var SCHEMA = 6, MAX_WORDS = 8, CONCEPT = 8, FIRES = 10;     // as in atlas/site/index_format.py
  var NOT_IN_PHRASE = 1073741824;                               // as in atlas/site/search_query.py (2 ** 30)
  var B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  var DIRECTIONS = ["promotes", "suppresses", "reads"], SRC_DIRECTION = [2, 2, 2, 2, 0, 1, 2, 2, 0, null, 2];
  var VERB = { promotes: "promote", suppresses: "suppress", reads: "read" };
  var SPLIT = /[\p{Z}\p{Cc}]/u;

  // The term of a token or query word: see atlas/site/search.py for the definition (index_format.py for the code).
  function normalise(text) {
    if (!text) return "";
    // Strip in two steps like the Python loop: leading markers and edge characters first,
    // then trailing edge characters (never a trailing \u0120 or \u2581, which are letters there).
    var t = text.normalize("NFKC");
    t = t.replace(/^[\u0120\u2581\p{P}\p{S}\p{Z}\p{C}]+/u, "").replace(/[\p{P}\p{S}\p{Z}\p{C}]+$/u, "");
    return t.toLowerCase();
  }

  function queryTerms(query) {
    var words = [], word = "";
    for (var ch of query) {
      if (SPLIT.test(ch)) { words.push(word); word = ""; } else { word += ch; }
    }
    words.push(word);
    var terms = [];
    words.forEach(function (w) {
      var t = normalise(w);
      if (t && terms.indexOf(t) < 0) terms.push(t);
    });
    return terms.slice(0, MAX_WORDS);
  }

  function shardOf(term, nShards) {
    var bytes = new TextEncoder().encode(term), h = 0x811c9dc5;
    for (var i = 0; i < bytes.length; i++) h = Math.imul(h ^ bytes[i], 0x01000193) >>> 0;
    return h % nShards;
  }

  function shardName(shard, nShards) {
    var width = Math.max(1, (nShards - 1).toString(16).length);
    var hex = shard.toString(16);
    while (hex.length < width) hex = "0" + hex;
    return hex + ".json";
  }

  function getJSON(url) {
    return fetch(url).then(function (r) {
      if (!r.ok) throw new Error(url + ": HTTP " + r.status);
      return r.json();
    });
  }

  // The postings of a term's entry, best first, each [layer, neuron, strength, src, rank, check, token]:
  // the twin of entry_postings() in atlas/site/index_format.py, which describes the format. A group of
  // fields is read as one number, below 2^53, so that the arithmetic is exact.
  function entryPostings(entry, layout) {
    var low = layout.min, radix = layout.radix, groups = layout.groups, width = 0;
    groups.forEach(function (g) { width += g[1]; });
    var words = entry.w === undefined ? [] : typeof entry.w === "string" ? entry.w.split(" ") : entry.w;
    var ev = entry.e || "", at = 0, p = entry.p, out = [];
    for (var start = 0; start < p.length; start += width) {
      var values = [], pos = start, f = 0;
      groups.forEach(function (g) {
        var x = 0, group = [];
        for (var k = 0; k < g[1]; k++) x = x * 64 + B64.indexOf(p[pos + k]);
        pos += g[1];
        for (var j = f + g[0] - 1; j >= f; j--) {
          var v = x % radix[j];
          group.unshift(v + low[j]);
          x = (x - v) / radix[j];
        }
        values = values.concat(group);
        f += g[0];
      });
      var src = values[3], variant = values[5], token;
      if (src === CONCEPT || src === FIRES) {     // a concept match: `variant` evidence words, each a varint index into w
        var picked = [];
        for (var n = 0; n < variant; n++) {
          var y = 0, d;
          while ((d = B64.indexOf(ev[at++])) >= 32) y = y * 32 + d - 32;
          picked.push(words[y * 32 + d]);
        }
        token = picked.join(", ");
      } else {
        token = entry.t[variant];
      }
      out.push([values[0], values[1], values[2], src, values[4], values[6], token]);
    }
    return out;
  }

  // A match's score: its strength, weighted by the neuron's clamp check (faithfulness x 100,
  // -1 when not measured) for matches on its top decoded `out` tokens; integers, as in Python.
  function score(strength, src, check, outTop) {
    return src === outTop && check >= 0 ? Math.floor((strength * (50 + check) + 50) / 100) : strength;
  }

  // Neurons by number of query words matched (the whole phrase counts as all), then place in
  // the phrase's own list (a known phrase is the concept asked for; NOT_IN_PHRASE where absent),
  // then best place in one word's list, then summed score, then (layer, neuron); a direction
  // filter first drops the other directions' matches. The twin of rank() in atlas/site/search_query.py.
  function rank(terms, meta, shards, direction) {
    // No prototype: a query word such as "constructor" must not find Object's own keys.
    var hits = new Map(), counts = {}, dirCounts = {}, aliases = Object.create(null);
    var outTop = meta.sources.indexOf("out top");
    var want = direction ? DIRECTIONS.indexOf(direction) : -1;
    var phrase = terms.length > 1 ? terms.join(" ") : null;
    terms.concat(phrase ? [phrase] : []).forEach(function (term) {
      // Own properties only: a word such as "constructor" must not find Object's prototype.
      var shard = shards[shardOf(term, meta.shards)];
      var entry = Object.prototype.hasOwnProperty.call(shard, term) ? shard[term] : null;
      if (entry && entry.a) aliases[term] = entry.a;      // [the English word the model reads it as, its language]
      counts[term] = entry ? entry.n : 0;
      dirCounts[term] = want >= 0 ? (entry ? entry.d[want] : 0) : counts[term];
      if (!entry) return;
      var position = 0, seen = new Set();     // a neuron's first posting of a term is its best match
      entryPostings(entry, meta.posting).forEach(function (p) {
        var src = p[3], check = p[5], key = p[0] + "/" + p[1];
        if (want >= 0 ? SRC_DIRECTION[src] !== want : seen.has(key)) return;
        seen.add(key);
        var hit = hits.get(key);
        if (!hit) {
          hit = { layer: p[0], neuron: p[1], label: null, words: new Set(), phrase: NOT_IN_PHRASE, best: position, score: 0,
                  faithfulness: check >= 0 ? check / 100 : null, matches: [] };
          hits.set(key, hit);
        }
        (term === phrase ? terms : [term]).forEach(function (t) { hit.words.add(t); });
        hit.best = Math.min(hit.best, position);
        if (term === phrase) hit.phrase = Math.min(hit.phrase, position);
        hit.score += score(p[2], src, check, outTop);
        var d = SRC_DIRECTION[src];
        hit.matches.push({ term: term, token: p[6], source: meta.sources[src],
                           direction: d === null ? null : DIRECTIONS[d], rank: p[4], strength: p[2] / 100 });
        position += 1;
      });
    });
    hits.forEach(function (h) { h.words = h.words.size; });
    var ordered = Array.from(hits.values()).sort(function (a, b) {
      return b.words - a.words || a.phrase - b.phrase || a.best - b.best || b.score - a.score ||
        a.layer - b.layer || a.neuron - b.neuron;
    });
    ordered.forEach(function (h) { h.score /= 100; });
    var result = { terms: terms, direction: direction, counts: counts, dirCounts: dirCounts, aliases: aliases,
                   phrase: null, hits: ordered,
                   matchAll: ordered.filter(function (h) { return h.words === terms.length; }).length };
    if (phrase) {
      result.phrase = { text: phrase, count: counts[phrase], dirCount: dirCounts[phrase] };
      delete counts[phrase]; delete dirCounts[phrase];
    }
    return result;
  }

  // The status line: the same sentence as status_line() in atlas/site/search_query.py.
  function statusLine(r) {
    var verb = r.direction ? VERB[r.direction] : null, n = function (x) { return x.toLocaleString("en"); };
    var parts = r.terms.map(function (t) {
      var read = r.aliases[t];
      return "\u2018" + t + "\u2019" + (read ? " (the model's " + read[1] + " for \u2018" + read[0] + "\u2019)" : "") +
        ": " + n(r.counts[t]) + " neurons match" + (verb ? ", " + n(r.dirCounts[t]) + " " + verb + " it" : "");
    });
    if (r.phrase && r.phrase.count) {
      parts.push("the phrase \u2018" + r.phrase.text + "\u2019: " + n(r.phrase.count) +
                 (verb ? ", " + n(r.phrase.dirCount) + " " + verb + " it" : ""));
    }
    var line = parts.join("; ");
    if (r.terms.length > 1) line += "; " + n(r.matchAll) + " of those kept match every word";
    var shown = Math.min(SHOWN, r.hits.length);
    if (!shown) return line + "; none to show" + (verb ? " that " + verb + " these words" : "");
    return line + "; showing the best " + n(shown) + (verb ? " that " + verb + " them" : "");
  }

  // Token text with its spaces shown, as on the neuron pages.
  var showToken = window.atlasText.showToken, visible = window.atlasText.visible;     // atlas-text.js

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }

  // One match in words: its direction with the token, then why it matched. The twin of match_words().
  function matchLine(m) {
    var line = el("span", "atlas-search-match");
    var src = m.source, tok = el("code", null, showToken(m.token));
    var dir = el("span", "atlas-search-dir atlas-search-dir--" + (m.direction || "other"));
    if (src === "concept" || src === "concept fires") {
      dir.textContent = (src === "concept" ? "promotes words near \u2018" + m.term + "\u2019" :
        "fires on words near \u2018" + m.term + "\u2019 in the corpus");
      line.appendChild(dir);
      line.appendChild(document.createTextNode(" via "));
      line.appendChild(el("code", "atlas-search-via", m.token));
    } else if (src === "description") {
      dir.textContent = "its description says \u2018" + m.token + "\u2019";     // the word itself, or what a reading copied
      line.appendChild(dir);
    } else {
      var bottom = /(bottom|min)$/.test(src);
      dir.textContent = src.indexOf("exemplar") === 0 ? (bottom ? "fires most negatively on" : "fires on") :
        src.indexOf("out") === 0 ? (bottom ? "suppresses" : "promotes") : "reads";
      line.appendChild(dir);
      line.appendChild(document.createTextNode(" "));
      line.appendChild(tok);
      if (src.indexOf("exemplar") === 0) line.appendChild(document.createTextNode(" in the corpus"));
      else if (src.indexOf("out") !== 0) {
        line.appendChild(document.createTextNode((bottom ? " negatively" : "") + " (" + src.split(" ")[0] + " side)"));
      }
    }
    // Literal and exemplar strengths are in σ; a concept or description match's is a score (search.py's shown_strength).
    var strength = src === "concept" || src === "concept fires" || src === "description" ? "strength " + m.strength.toFixed(2) :
      m.strength.toFixed(2) + "\u03c3";
    line.appendChild(el("span", "atlas-search-why", ": \u2018" + m.term + "\u2019, " + src + " #" + m.rank + ", " + strength));
    return line;
  }

  function showHits(result) {
    list.textContent = "";
    result.hits.slice(0, SHOWN).forEach(function (h) {
      var li = el("li");
      var head = el("div", "atlas-search-head");
      var a = el("a", "atlas-search-neuron", "L" + h.layer + " / N" + h.neuron);
      a.href = "../neurons/" + h.layer + "/" + h.neuron + "/";
      head.appendChild(a);
      head.appendChild(el("span", "atlas-search-label" + (h.label ? "" : " atlas-search-nolabel"), h.label ? visible(h.label) : "no label yet"));
      head.appendChild(el("span", "atlas-search-strength", h.score.toFixed(2)));   // "score" comes from the CSS
      if (h.faithfulness !== null) {
        head.appendChild(el("span", "atlas-search-pushed", "pushed " + h.faithfulness.toFixed(2)));
      }
      li.appendChild(head);
      var ev = el("div", "atlas-search-evidence");
      h.matches.forEach(function (m) { ev.appendChild(matchLine(m)); });
      li.appendChild(ev);
      list.appendChild(li);
    });
    status.textContent = statusLine(result);
    list.setAttribute("data-hits", String(result.hits.length));
    status.setAttribute("data-state", "done");
  }

  function conceptSearch(query, direction) {
    var terms = queryTerms(query);
    if (!terms.length) {
      status.textContent = query.trim() ? "Nothing searchable in that query." : "Type a concept, e.g. dog.";
      status.setAttribute("data-state", "done");
      list.setAttribute("data-hits", "0");
      return Promise.resolve();
    }
    status.textContent = "searching\u2026";
    status.setAttribute("data-state", "searching");   // not the last search's "done" while this one runs
    return getJSON("idx/meta.json").then(function (meta) {
      // An index of another layout would be misread, not refused: say so (a stale cached script).
      if (meta.schema !== SCHEMA) {
        throw new Error("the index is of schema " + meta.schema + ", this page reads " + SCHEMA + "; reload the page");
      }
      var wanted = [];
      // The words' shards, and the whole phrase's (see rank).
      terms.concat(terms.length > 1 ? [terms.join(" ")] : []).forEach(function (t) {
        var b = shardOf(t, meta.shards);
        if (wanted.indexOf(b) < 0) wanted.push(b);
      });
      return Promise.all(wanted.map(function (b) { return getJSON("idx/" + shardName(b, meta.shards)); }))
        .then(function (parts) {
          var shards = {};
          wanted.forEach(function (b, i) { shards[b] = parts[i]; });
          var result = rank(terms, meta, shards, direction);
          // Labels for the hits shown, from the label files (idx/labels/<layer>/<chunk>.json).
          var chunk = meta.label_chunk, files = [];
          result.hits.slice(0, SHOWN).forEach(function (h) {
            var f = h.layer + "/" + Math.floor(h.neuron / chunk);
            if (files.indexOf(f) < 0) files.push(f);
          });
          return Promise.all(files.map(function (f) { return getJSON("idx/labels/" + f + ".json"); }))
            .then(function (lists) {
              result.hits.slice(0, SHOWN).forEach(function (h) {
                var labels = lists[files.indexOf(h.layer + "/" + Math.floor(h.neuron / chunk))];
                h.label = labels[h.neuron % chunk];
              });
              showHits(result);
            });
        });
    }).catch(function (err) {
      status.textContent = "search failed: " + err.message;
      status.setAttribute("data-state", "error");
    });
  }

  // The filter is part of the URL (?q=money&dir=promotes), so a filtered search can be linked.
  var params = new URLSearchParams(window.location.search);
  var query = params.get("q") || "";
  var direction = DIRECTIONS.indexOf(params.get("dir")) >= 0 ? params.get("dir") : null;
  input.value = query;
  filter.querySelectorAll("input[name=dir]").forEach(function (radio) {
    radio.checked = radio.value === (direction || "all");
    radio.addEventListener("change", function () {
      direction = radio.value === "all" ? null : radio.value;
      var next = new URLSearchParams(window.location.search);
      if (direction) next.set("dir", direction); else next.delete("dir");
      history.replaceState(null, "", "?" + next.toString());
      conceptSearch(query, direction);
    });
  });
  // Submitting leaves out dir=all, so an unfiltered search keeps its plain ?q= link.
  document.getElementById("atlas-search-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var next = new URLSearchParams();
    next.set("q", input.value);
    if (direction) next.set("dir", direction);
    window.location.href = "?" + next.toString();
  });
  conceptSearch(query, direction);
  window.atlasSearch = { normalise: normalise, queryTerms: queryTerms, shardOf: shardOf, score: score, entryPostings: entryPostings,
                         schema: SCHEMA, pageSchema: data.schema };
})();
