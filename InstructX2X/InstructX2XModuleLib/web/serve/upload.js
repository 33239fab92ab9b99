// The page's side of an upload: refuse what is over the limit before sending a byte, then
// send the files with trame-slicer's chunked loader (its chunk_loader.js).
window.instructx2x_upload = function instructx2x_upload(event, triggerName, limitMb) {
  const files = event && event.target ? event.target.files : null;
  if (!files || !files.length) {
    return "";
  }
  const size = Array.from(files).reduce((total, file) => total + file.size, 0);
  if (size > limitMb * 1048576) {
    return `The upload is ${(size / 1048576).toFixed(1)} MB; the limit is ${limitMb} MB.`;
  }
  window.load_files_by_chunks(files, { trigger_name: triggerName });
  return "";
};
