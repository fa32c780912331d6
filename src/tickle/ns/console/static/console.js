// The Tickle console's only script: the live run grid, fed by server-sent events (one message per
// tick with every row that changed), the fleet's live counts, and the run-now form's conveniences.
"use strict";

function liveGrid(table) {
  const source = new EventSource(table.dataset.events);
  const live = document.getElementById("live");
  const counts = document.getElementById("status-counts");
  source.onmessage = (message) => {
    const update = JSON.parse(message.data);
    table.dataset.messages = String(Number(table.dataset.messages || "0") + 1);
    for (const row of update.rows) {
      const tr = document.getElementById("ex-" + row.id);
      if (!tr) continue;
      tr.dataset.status = row.status;
      const status = tr.querySelector("td.status span");
      status.textContent = row.status;
      status.className = "state " + row.status;
      tr.querySelector("td.via").textContent = row.via;
      for (const td of tr.querySelectorAll("td.cell")) {
        const value = row.cells[td.dataset.step];
        td.textContent = value === null ? "" : String(value);
        td.classList.toggle("done", value !== null);
      }
    }
    counts.replaceChildren(
      ...Object.entries(update.counts)
        .filter(([, n]) => n > 0)
        .map(([status, n]) => {
          const li = document.createElement("li");
          li.className = "state " + status;
          li.id = "count-" + status;
          li.textContent = status + " " + n;
          return li;
        })
    );
    if (update.done) {
      source.close();
      live.textContent = "finished";
      const cancel = document.querySelector("#cancel-run button");
      if (cancel) cancel.disabled = true; // nothing is left to cancel
      table.dataset.done = "true";
    }
  };
  source.addEventListener("ended", () => {
    // the session ended (logout elsewhere, or expiry): stop, and say so
    source.close();
    table.dataset.done = "true";
    live.textContent = "session ended: reload to log in again";
  });
  source.onerror = () => {
    if (table.dataset.done !== "true") live.textContent = "reconnecting…";
  };
}

function liveCounts(list) {
  // the fleet's counts per state, sent whenever they change
  const source = new EventSource(list.dataset.events);
  source.onmessage = (message) => {
    const update = JSON.parse(message.data);
    for (const [state, n] of Object.entries(update.counts)) {
      const count = document.getElementById("count-" + state);
      if (count) count.textContent = String(n);
    }
    list.dataset.messages = String(Number(list.dataset.messages || "0") + 1);
  };
  source.addEventListener("ended", () => source.close());
}

function runNowForm(form) {
  // choosing a task, a job or typing a command selects its radio button
  for (const [name, value] of [["task_id", "task"], ["job_id", "job"], ["command", "command"]]) {
    form.elements[name].addEventListener("input", () => {
      form.querySelector(`input[name="what"][value="${value}"]`).checked = true;
    });
  }
  const all = form.elements.all;
  const sync = () => {
    form.elements.computers.disabled = all.checked;
    form.elements.groups.disabled = all.checked;
  };
  all.addEventListener("change", sync);
  sync();
}

document.addEventListener("DOMContentLoaded", () => {
  const grid = document.getElementById("grid");
  if (grid) liveGrid(grid);
  const counts = document.getElementById("fleet-counts");
  if (counts) liveCounts(counts);
  const runNow = document.getElementById("run-now");
  if (runNow) runNowForm(runNow);
});
