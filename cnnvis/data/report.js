
(function(){
  function key(row, i){
    var c = row.cells[i]; if (!c) return "";
    return c.hasAttribute("data-sort") ? c.getAttribute("data-sort") : c.textContent.trim();
  }
  function sortBy(th){
    var table = th.closest("table"), body = table.tBodies[0], i = th.cellIndex;
    var asc = th.getAttribute("aria-sort") !== "ascending";
    var rows = Array.prototype.slice.call(body.rows);
    var numeric = rows.every(function(r){ var k = key(r, i); return k === "" || !isNaN(Number(k)); });
    rows.sort(function(a, b){
      var x = key(a, i), y = key(b, i);
      if (x === "" || y === "") return (x === "") - (y === "");
      var d = numeric ? Number(x) - Number(y) : x.localeCompare(y, undefined, {numeric: true});
      return asc ? d : -d;
    });
    rows.forEach(function(r){ body.appendChild(r); });
    Array.prototype.forEach.call(th.parentNode.cells, function(h){ h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
  }
  document.querySelectorAll("table.sortable thead th").forEach(function(th){
    th.addEventListener("click", function(){ sortBy(th); });
    th.addEventListener("keydown", function(e){
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(th); }
    });
  });
  var box = document.getElementById("lightbox");
  function close(){ box.hidden = true; box.replaceChildren(); }
  document.addEventListener("click", function(e){
    var a = e.target.closest && e.target.closest("a.zoom");
    if (!a || e.ctrlKey || e.metaKey || e.shiftKey) return;
    e.preventDefault();
    var img = new Image(), cap = document.createElement("p");
    img.src = a.getAttribute("href"); img.alt = a.querySelector("img").alt;
    cap.textContent = a.title + " (click or Esc to close)";
    box.replaceChildren(img, cap); box.hidden = false;
  });
  box.addEventListener("click", close);
  document.addEventListener("keydown", function(e){ if (e.key === "Escape" && !box.hidden) close(); });
})();
