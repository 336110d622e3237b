// The video grid: how many columns give the largest 16:9 tiles in the space there is. Pure.

/**
 * @param {number} count tiles
 * @param {number} width px available
 * @param {number} height px available
 * @returns {{cols: number, rows: number, tile: number}} `tile` = the width of one tile, px
 */
export function bestGrid(count, width, height, { gap = 12, aspect = 16 / 9 } = {}) {
  let best = { cols: 1, rows: Math.max(1, count), tile: 0 };
  // From one row down to one column; fewer columns must win clearly (wide layouts read better).
  for (let cols = Math.max(1, count); cols >= 1; cols--) {
    const rows = Math.ceil(count / cols);
    const tile = Math.floor(Math.min((width - gap * (cols - 1)) / cols, ((height - gap * (rows - 1)) / rows) * aspect));
    if (tile > best.tile * 1.1) best = { cols, rows, tile };
  }
  return best;
}
