// Live job progress for the console: follows each [data-events] element's Server-Sent Events
// (GET /console/jobs/{id}/events: snapshot, task, progress, end) and updates its bar and the
// task rows of the page. No framework; the server renders everything else.
"use strict";

function setText(root, selector, text) {
  const el = root.querySelector(selector);
  if (el) el.textContent = text;
}

function showProgress(box, status, p) {
  const bar = box.querySelector(".bar");
  bar.className = "bar status-" + status;
  bar.querySelector("span").style.width = p.percent + "%";
  setText(box, ".pct", (Math.round(p.percent * 10) / 10).toFixed(1) + "%");
  setText(box, ".status", status);
  setText(box, ".counts", p.completed_tasks + " done · " + p.failed_tasks + " failed · " +
          p.cancelled_tasks + " cancelled of " + p.total_tasks);
  setText(box, ".eta", p.eta_seconds ? "ETA " + Math.round(p.eta_seconds) + " s" : "");
  if (p.message) setText(box, ".message", p.message);
}

let reloading = false;

function showTask(task) {
  const row = document.querySelector('tr[data-task-id="' + task.id + '"]');
  if (!row) {
    // A task the page does not list yet (the coordinator has just planned the job): on the Job
    // page, render it again, once, to get the rows; the new stream starts from a snapshot.
    if (!reloading && document.querySelector("[data-reload-on-end]")) {
      reloading = true;
      window.setTimeout(() => window.location.reload(), 200);
    }
    return;
  }
  row.className = "task status-" + task.status;
  setText(row, ".t-status", task.status);
  setText(row, ".t-attempts", task.attempts);
  setText(row, ".t-records", task.record_count);
  setText(row, ".t-chunks", task.chunks);
  if (task.error) setText(row, ".t-error", task.error.message);
}

function follow(box) {
  const source = new EventSource(box.dataset.events);
  box.dataset.live = "1";
  source.addEventListener("snapshot", (e) => {
    const job = JSON.parse(e.data);
    showProgress(box, job.status, job.progress);
    (job.tasks || []).forEach(showTask);
  });
  source.addEventListener("progress", (e) => {
    const p = JSON.parse(e.data);
    showProgress(box, p.status, p);
  });
  source.addEventListener("task", (e) => showTask(JSON.parse(e.data)));
  source.addEventListener("end", (e) => {
    const job = JSON.parse(e.data);
    source.close();
    showProgress(box, job.status, job.progress);
    box.dataset.live = "done";
    // The job page re-renders once at the end: errors in words, the log, Retry.
    if (box.dataset.reloadOnEnd) window.setTimeout(() => window.location.reload(), 300);
  });
  source.onerror = () => {
    // The stream closes after "end"; before that, EventSource reconnects by itself.
    if (box.dataset.live === "done") source.close();
  };
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-events]").forEach(follow);
});
