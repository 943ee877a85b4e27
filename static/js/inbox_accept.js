// The page of a study accepted in the background (docs/inbox.md): asks every two seconds how
// far the move into the archive is, shows it in words and on the bar, and reloads the page
// for the final state (accepted, files refused, or stopped) once the move ends.
(() => {
  "use strict";
  const box = document.getElementById("accept-progress");
  const words = document.getElementById("accept-words");
  const bar = document.getElementById("accept-bar");
  if (!box || !words || !bar) return;
  const pattern = box.dataset.words || "";
  const ask = async () => {
    try {
      const answer = await fetch(box.dataset.url, {
        headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (answer.ok) {
        const seen = await answer.json();
        if (seen.state !== "accepting" || seen.failed) {
          window.location.reload();
          return;
        }
        bar.max = Math.max(seen.total, 1);
        bar.value = seen.done;
        words.textContent = pattern.replace("{done}", String(seen.done))
          .replace("{total}", String(seen.total));
      }
    } catch (_offline) {
      // The connection dropped for a moment: ask again.
    }
    window.setTimeout(ask, 2000);
  };
  window.setTimeout(ask, 2000);
})();
