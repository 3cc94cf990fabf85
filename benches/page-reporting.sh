# Sourced by the benches. In a virtual machine with free page reporting
# (virtio-balloon), memory one run frees (the page cache of an output it
# replaced, a daemon's buffers) goes back to the host at once, and the
# next run to take it pays the host's page faults: measured here, 2-3 s
# of kernel time in a copy into the page cache instead of 0.3 s, for
# whichever tool came next. Where the kernel lets root delay reporting
# (page_reporting.min_free_ms), hold_page_reporting holds freed pages for
# a minute and restore_page_reporting (call it at exit) puts the setting
# back; BENCH_PAGE_REPORTING=keep leaves it alone.
page_reporting_knob=/sys/module/page_reporting/parameters/min_free_ms
page_reporting_saved=""
hold_page_reporting() {
  local knob=$page_reporting_knob
  if [ "${BENCH_PAGE_REPORTING:-}" != keep ] && [ -w "$knob" ]; then
    page_reporting_saved=$(cat "$knob")
    echo 60000 > "$knob"
    echo "free page reporting delayed for the bench ($knob: $page_reporting_saved -> 60000)"
  elif [ -e "$knob" ]; then
    echo "free page reporting active: runs may stall when reused memory faults in from the host"
  fi
}
restore_page_reporting() {
  if [ -n "$page_reporting_saved" ]; then echo "$page_reporting_saved" > "$page_reporting_knob"; fi
}
