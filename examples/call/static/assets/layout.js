// The video grid: how many columns give the largest tiles in the space there is. Pure.

/**
 * Tiles are laid out as 16:9 and then made taller, up to 4:3, where the rows leave room (the
 * video is cropped to fill them), so two people side by side do not float in empty space.
 *
 * @param {number} count tiles
 * @param {number} width px available
 * @param {number} height px available
 * @returns {{cols: number, rows: number, tile: number, tileHeight: number}} px
 */
export function bestGrid(count, width, height, { gap = 12 } = {}) {
  let best = { cols: 1, rows: Math.max(1, count), tile: 0 };
  // From one row down to one column; fewer columns must win clearly (wide layouts read better).
  for (let cols = Math.max(1, count); cols >= 1; cols--) {
    const rows = Math.ceil(count / cols);
    const tile = Math.floor(Math.min((width - gap * (cols - 1)) / cols, ((height - gap * (rows - 1)) / rows) * (16 / 9)));
    if (tile > best.tile * 1.1) best = { cols, rows, tile };
  }
  const rowHeight = (height - gap * (best.rows - 1)) / best.rows;
  return { ...best, tileHeight: Math.floor(Math.max(best.tile * (9 / 16), Math.min(rowHeight, best.tile * (3 / 4)))) };
}
