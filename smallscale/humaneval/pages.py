"""The web app's templates, stylesheet and script, kept as strings so that they ship inside the
Python package (no package-data configuration) and need nothing from the internet.

Templates are rendered by a Jinja2 environment with autoescaping on: every value, model output
above all, reaches the page as text. The script only adds keyboard shortcuts; every form works
without it.
"""

BASE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}Human evaluation{% endblock %}</title>
<link rel="stylesheet" href="/static/app.css">
<script src="/static/app.js" defer></script>
</head>
<body>
<main>
{% block body %}{% endblock %}
</main>
</body>
</html>
"""

INVITE = """{% extends "base.html" %}
{% block title %}Invitation needed{% endblock %}
{% block body %}
<h1>Invitation needed</h1>
<p class="error" role="alert" id="message">{{ message }}</p>
{% endblock %}
"""

RATE = """{% extends "base.html" %}
{% block body %}
<header>
  <span>Rater <b id="rater">{{ rater }}</b></span>
  <span class="progress"><progress value="{{ done }}" max="{{ total }}"></progress>
    <span id="progress">{{ done }} of {{ total }}</span> comparisons judged</span>
</header>
{% if done == 0 %}
<p>You will see the start of a text and two continuations of it, written by two different systems.
The systems are hidden and their sides are random. Pick the better continuation: fluent, coherent,
and a plausible way to go on from the start. To continue later, open your personal link again; it is
yours alone, so do not share it.</p>
{% endif %}
<section class="prompt">
  <h2>Start of the text</h2>
  <div class="text" id="prompt">{{ prompt }}</div>
</section>
<div class="pair">
  <section class="side"><h2>A</h2><div class="text" id="text-a">{{ left }}</div></section>
  <section class="side"><h2>B</h2><div class="text" id="text-b">{{ right }}</div></section>
</div>
<form method="post" action="/vote" id="vote-form">
  <input type="hidden" name="csrf" value="{{ csrf }}">
  <input type="hidden" name="token" value="{{ token }}">
  <button type="submit" disabled hidden aria-hidden="true" tabindex="-1"></button>
  <label class="reason">Reason (optional, one line)
    <input id="reason" name="reason" type="text" maxlength="{{ max_reason }}" autocomplete="off"></label>
  <div class="answers">
  {% for value, label, keys in answers %}
    <button type="submit" name="answer" value="{{ value }}" id="answer-{{ value }}" data-keys="{{ keys | join(' ') }}">
      {{ label }}{% for key in keys %} <kbd>{{ key }}</kbd>{% endfor %}</button>
  {% endfor %}
  </div>
</form>
<p class="hint">Keys: 1 or A = A better, 2 or B = B better, 3 or T = tie, 4 or X = both bad.
Esc leaves the reason box.</p>
{% endblock %}
"""

DONE = """{% extends "base.html" %}
{% block body %}
<h1>Thank you, {{ rater }}</h1>
<p id="progress">You have judged all {{ total }} comparisons ({{ done }} votes).</p>
{% endblock %}
"""

ERROR = """{% extends "base.html" %}
{% block title %}{{ code }} {{ name }}{% endblock %}
{% block body %}
<h1>{{ code }} {{ name }}</h1>
<p class="error" role="alert" id="message">{{ message }}</p>
<p><a href="/rate">Back to the comparisons</a></p>
{% endblock %}
"""

TEMPLATES = {"base.html": BASE, "invite.html": INVITE, "rate.html": RATE, "done.html": DONE, "error.html": ERROR}

CSS = """
body { font: 16px/1.5 system-ui, sans-serif; margin: 0; background: #f6f6f4; color: #1d1d1b; }
main { max-width: 1200px; margin: 0 auto; padding: 1rem 1.5rem 2rem; }
header { display: flex; justify-content: space-between; gap: 1rem; flex-wrap: wrap; margin-bottom: 1rem; }
h2 { font-size: 0.9rem; text-transform: uppercase; letter-spacing: 0.05em; color: #666; margin: 0 0 0.4rem; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: Georgia, serif; background: #fff;
        border: 1px solid #ddd; border-radius: 6px; padding: 0.8rem 1rem; }
.prompt .text { background: #eef1f5; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; margin: 1rem 0; }
.reason { display: block; margin-bottom: 0.8rem; }
.reason input { width: 100%; box-sizing: border-box; padding: 0.4rem; font: inherit; }
.answers { display: flex; gap: 0.6rem; flex-wrap: wrap; }
.answers button { font: inherit; padding: 0.5rem 1.1rem; border-radius: 6px; border: 1px solid #888;
                  background: #fff; cursor: pointer; }
.answers button:hover, .answers button:focus { background: #e8eefc; }
kbd { font-size: 0.8em; border: 1px solid #aaa; border-radius: 3px; padding: 0 0.3em; color: #555; }
.hint { color: #666; font-size: 0.9rem; }
.error { color: #a00; font-weight: bold; }
@media (max-width: 700px) { .pair { grid-template-columns: 1fr; } }
"""

JS = """// Keyboard shortcuts for the vote form. The form works without this script.
(function () {
  "use strict";
  var form = document.getElementById("vote-form");
  if (!form) { return; }
  var sent = false;
  form.addEventListener("submit", function (event) {
    if (sent) { event.preventDefault(); }  // one vote per page, however fast the keys
    sent = true;
  });
  window.addEventListener("pageshow", function () { sent = false; });
  document.addEventListener("keydown", function (event) {
    var target = event.target;
    if (target && target.tagName === "INPUT") {  // typing a reason: letters are text, not votes
      if (event.key === "Escape") { target.blur(); }
      if (event.key === "Enter") { event.preventDefault(); }
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) { return; }
    var key = event.key.toLowerCase();
    if (!/^[a-z0-9]$/.test(key)) { return; }
    var button = form.querySelector('button[data-keys~="' + key + '"]');
    if (button) {
      event.preventDefault();
      button.click();
    }
  });
})();
"""

STATIC = {"app.css": ("text/css", CSS), "app.js": ("text/javascript", JS)}
