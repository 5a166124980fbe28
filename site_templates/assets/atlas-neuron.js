// Neuron pages: keyboard navigation and copy buttons. Everything on a page works without
// this script; it only adds shortcuts.
(function () {
  "use strict";

  // A link with data-key="k ArrowLeft" is followed when one of those keys is pressed.
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.defaultPrevented) return;
    var target = event.target;
    if (target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT|BUTTON)$/.test(target.tagName))) return;
    var links = document.querySelectorAll("a[data-key]");
    for (var i = 0; i < links.length; i++) {
      if (links[i].getAttribute("data-key").split(" ").indexOf(event.key) >= 0) {
        event.preventDefault();
        window.location.href = links[i].href;
        return;
      }
    }
  });

  // A button with data-copy="ID" copies the text of element ID: the async clipboard where
  // the page is a secure context, else a selection and execCommand, which file:// allows.
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

  var buttons = document.querySelectorAll("button[data-copy]");
  for (var i = 0; i < buttons.length; i++) {
    (function (button) {
      var label = button.textContent;
      var element = document.getElementById(button.getAttribute("data-copy"));
      if (!element) return;
      button.hidden = false;
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
    })(buttons[i]);
  }
})();
