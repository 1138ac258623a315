// The page's only script: send the chosen image to /predict and /attention, show the answers.
"use strict";

const drop = document.getElementById("drop");
const input = document.getElementById("file");
const statusLine = document.getElementById("status");

function say(text, isError) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", Boolean(isError));
}

async function post(path, file) {
  const response = await fetch(path, {
    method: "POST", body: file, headers: {"Content-Type": file.type || "application/octet-stream"},
  });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error || message; } catch (ignored) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function showLabels(predictions) {
  const list = document.getElementById("labels");
  list.replaceChildren();
  for (const {label, score} of predictions) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = label;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = (100 * score).toFixed(1) + "%";
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "score";
    value.textContent = (100 * score).toFixed(2) + " %";
    item.append(name, bar, value);
    list.append(item);
  }
}

// Hide and empty the previous image's results, so that an error never shows under them.
function clearResult() {
  document.getElementById("result").hidden = true;
  document.getElementById("labels").replaceChildren();
  for (const id of ["photo", "overlay"]) {
    const picture = document.getElementById(id);
    if (picture.src) URL.revokeObjectURL(picture.src);
    picture.removeAttribute("src");
  }
}

async function classify(file) {
  document.body.classList.remove("done");
  say("classifying " + file.name + "…");
  clearResult();
  const photo = document.getElementById("photo");
  const overlay = document.getElementById("overlay");
  try {
    const [predictions, picture] = await Promise.all([
      post("predict?top_k=5", file).then((r) => r.json()),
      post("attention", file).then((r) => r.blob()),
    ]);
    photo.src = URL.createObjectURL(file);
    overlay.src = URL.createObjectURL(picture);
    showLabels(predictions);
    document.getElementById("result").hidden = false;
    say(file.name + ": " + predictions[0].label);
    document.body.classList.add("done");
  } catch (error) {
    say(file.name + ": " + error.message, true);
  }
}

input.addEventListener("change", () => { if (input.files.length) classify(input.files[0]); });
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) classify(event.dataTransfer.files[0]);
});

fetch("info").then((r) => r.json()).then((info) => {
  document.getElementById("model").textContent =
    info.model + " · " + info.labels.length + " labels · " + info.input_size + " px · " +
    info.engine + " " + info.precision;
}).catch(() => say("the service's /info did not answer", true));
