// The search page: concept search over the sharded token index in idx/, and full-text
// (full-text search with pagefind was removed with the site budgets: see the README).
// normalise, queryTerms, shardOf and rank are twins of those in atlas/site/search.py: the
// command line and this page must give the same ranking. Every string from the index is
// untrusted (token text, labels) and reaches the page through textContent only.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("atlas-search-data").textContent);
  var input = document.getElementById("atlas-search-q");
  var status = document.getElementById("atlas-search-status");
  var list = document.getElementById("atlas-search-results");
  var SHOWN = 50;
  var SCHEMA = 3, MAX_WORDS = 8, POSTING = 7;     // SCHEMA and POSTING as in atlas/site/search.py
  var SPLIT = /[\p{Z}\p{Cc}]/u;

  // The term of a token or query word: see atlas/site/search.py for the definition.
  function normalise(text) {
    if (!text) return "";
    // Strip in two steps like the Python loop: leading markers and edge characters first,
    // then trailing edge characters (never a trailing Ġ or ▁, which are letters there).
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

  // A match's score: its strength, weighted by the neuron's clamp check (faithfulness x 100,
  // -1 when not measured) for matches on its top decoded `out` tokens; integers, as in Python.
  function score(strength, src, check, outTop) {
    return src === outTop && check >= 0 ? Math.floor((strength * (50 + check) + 50) / 100) : strength;
  }

  // Neurons by number of query words matched, then summed score, then (layer, neuron).
  function rank(terms, meta, shards) {
    var hits = new Map(), counts = {}, outTop = meta.sources.indexOf("out top");
    terms.forEach(function (term) {
      // Own properties only: a word such as "constructor" must not find Object's prototype.
      var shard = shards[shardOf(term, meta.shards)];
      var entry = Object.prototype.hasOwnProperty.call(shard, term) ? shard[term] : null;
      counts[term] = entry ? entry.n : 0;
      if (!entry) return;
      var p = entry.p;
      for (var i = 0; i < p.length; i += POSTING) {
        var key = p[i] + "/" + p[i + 1], hit = hits.get(key);
        if (!hit) {
          hit = { layer: p[i], neuron: p[i + 1], words: 0, score: 0,
                  faithfulness: p[i + 6] >= 0 ? p[i + 6] / 100 : null, matches: [] };
          hits.set(key, hit);
        }
        hit.words += 1;
        hit.score += score(p[i + 2], p[i + 3], p[i + 6], outTop);
        hit.matches.push({ term: term, token: entry.t[p[i + 5]], source: meta.sources[p[i + 3]],
                           rank: p[i + 4], strength: p[i + 2] / 100 });
      }
    });
    var ordered = Array.from(hits.values()).sort(function (a, b) {
      return b.words - a.words || b.score - a.score || a.layer - b.layer || a.neuron - b.neuron;
    });
    ordered.forEach(function (h) { h.score /= 100; });
    return { counts: counts, hits: ordered };
  }

  // Token text with its spaces shown, as on the neuron pages.
  function showToken(token) {
    return token.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5")
      .replace(/[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu, function (c) {
        return "\u27e8U+" + c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0") + "\u27e9";
      });
  }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }

  function showHits(result, terms) {
    list.textContent = "";
    result.hits.slice(0, SHOWN).forEach(function (h) {
      var li = el("li");
      var a = el("a", "atlas-search-neuron", "L" + h.layer + " / N" + h.neuron);
      a.href = "../neurons/" + h.layer + "/" + h.neuron + "/";
      li.appendChild(a);
      li.appendChild(el("span", "atlas-search-strength", h.score.toFixed(2)));
      if (h.faithfulness !== null) {
        li.appendChild(el("span", "atlas-search-pushed", "pushed " + h.faithfulness.toFixed(2)));
      }
      var ev = el("span", "atlas-search-evidence");
      h.matches.forEach(function (m, i) {
        if (i) ev.appendChild(document.createTextNode(" \u00b7 "));
        if (m.source === "concept") {
          // A concept match: the neuron's decoded terms that lie near the query word.
          ev.appendChild(document.createTextNode("\u201c" + m.term + "\u201d via "));
          ev.appendChild(el("code", "atlas-search-via", m.token));
          ev.appendChild(document.createTextNode(" (concept, " + m.strength.toFixed(2) + "\u03c3)"));
          return;
        }
        ev.appendChild(el("code", null, showToken(m.token)));
        ev.appendChild(document.createTextNode(" " + m.source + " #" + m.rank + " (" + m.strength.toFixed(2) + "\u03c3)"));
      });
      li.appendChild(ev);
      list.appendChild(li);
    });
    var parts = terms.map(function (t) {
      return "\u201c" + t + "\u201d: " + result.counts[t].toLocaleString("en") + " neurons";
    });
    status.textContent = result.hits.length ?
      parts.join(", ") + "; showing " + Math.min(SHOWN, result.hits.length) + " of the best " +
        result.hits.length.toLocaleString("en") + "." :
      "No neuron decodes to or fires on " + terms.map(function (t) { return "\u201c" + t + "\u201d"; }).join(" or ") + ".";
    list.setAttribute("data-hits", String(result.hits.length));
    status.setAttribute("data-state", "done");
  }

  function conceptSearch(query) {
    var terms = queryTerms(query);
    if (!terms.length) {
      status.textContent = query.trim() ? "Nothing searchable in that query." : "Type a concept, e.g. dog.";
      status.setAttribute("data-state", "done");
      list.setAttribute("data-hits", "0");
      return Promise.resolve();
    }
    status.textContent = "searching\u2026";
    return getJSON("idx/meta.json").then(function (meta) {
      // An index of another layout would be misread, not refused: say so (a stale cached script).
      if (meta.schema !== SCHEMA) {
        throw new Error("the index is of schema " + meta.schema + ", this page reads " + SCHEMA + "; reload the page");
      }
      var wanted = [];
      terms.forEach(function (t) { var b = shardOf(t, meta.shards); if (wanted.indexOf(b) < 0) wanted.push(b); });
      return Promise.all(wanted.map(function (b) { return getJSON("idx/" + shardName(b, meta.shards)); }))
        .then(function (parts) {
          var shards = {};
          wanted.forEach(function (b, i) { shards[b] = parts[i]; });
          showHits(rank(terms, meta, shards), terms);
        });
    }).catch(function (err) {
      status.textContent = "search failed: " + err.message;
      status.setAttribute("data-state", "error");
    });
  }

  var query = new URLSearchParams(window.location.search).get("q") || "";
  input.value = query;
  conceptSearch(query);
  window.atlasSearch = { normalise: normalise, queryTerms: queryTerms, shardOf: shardOf, score: score,
                         schema: SCHEMA, pageSchema: data.schema };
})();
