// Neuron pages: keyboard navigation, copy buttons and strip values for the keyboard. Everything on a page works without
// this script; it only adds shortcuts.
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

  var blocks = document.querySelectorAll("pre[data-copy][id]");
  for (var i = 0; i < blocks.length; i++) addCopyButton(blocks[i]);
})();
