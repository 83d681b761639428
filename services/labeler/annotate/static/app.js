// Keyboard-only labelling: 1 / 2 / 0 / b / s press the matching button, u undoes, r focuses the
// rationale, g opens the guidelines. Keys typed into the rationale stay text; Esc leaves it.
(function () {
  "use strict";
  var sent = false;
  document.addEventListener("keydown", function (ev) {
    var t = ev.target;
    if (t && (t.tagName === "TEXTAREA" || t.tagName === "INPUT")) {
      if (ev.key === "Escape") { t.blur(); }
      return;
    }
    if (ev.ctrlKey || ev.metaKey || ev.altKey || sent) { return; }
    var key = ev.key.toLowerCase();
    var button = document.querySelector('#judge-form button[data-key="' + key + '"]');
    if (button) {
      ev.preventDefault();
      sent = true;  // one judgement per page: a held key must not submit twice
      button.click();
      return;
    }
    if (key === "u" && document.getElementById("undo-form")) {
      ev.preventDefault();
      sent = true;
      document.getElementById("undo-form").submit();
    } else if (key === "r" && document.getElementById("rationale")) {
      ev.preventDefault();
      document.getElementById("rationale").focus();
    } else if (key === "g") {
      ev.preventDefault();
      window.open("/guidelines", "_blank", "noopener");
    }
  });
})();
