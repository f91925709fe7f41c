// The page's state, shared by its modules: the image, the points, the view, the history.
// Points are kept in the pixels of the image as shown (EXIF orientation applied), the frame the
// server answers in; the view only scales and moves them.

export const $ = (id) => document.getElementById(id);
export const SVG = "http://www.w3.org/2000/svg";
export const MARK_PX = 7; // mark radius on screen, whatever the zoom
export const HIT_PX = 11; // a click this close to a point removes it
export const DRAG_PX = 4; // a press that moves further is a pan (or a box), not a click
export const KEY_STEP_PX = 4; // arrow keys move the cursor this far on screen (Shift: x8)

export const state = {
  info: null, // GET /info
  key: sessionStorage.getItem("seqops-key") || "",
  file: null, // the Blob sent to the server
  name: "", // a file name for exports
  width: 0, // the image as shown (EXIF orientation applied), px
  height: 0,
  points: [], // [{x, y, by: "model" | "person"}]
  boxes: [], // exemplar boxes [x1, y1, x2, y2]
  confidence: null, // the last count's count_confidence (null after a correction)
  stoppedBy: "",
  undo: [],
  redo: [],
  running: null, // AbortController of the count in flight
  view: { scale: 1, x: 0, y: 0, fit: true },
  cursor: null, // keyboard cursor {x, y} in image px
  keyboard: false, // the cursor is shown: the last move came from the keyboard
  selected: -1, // index of the selected point (keyboard)
  boxStart: null, // first corner of an exemplar box being drawn
  exemplarMode: false,
  timings: {}, // performance.now() marks, read by the browser tests
};
