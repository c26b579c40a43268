// softce CLI — PNG charts through PLplot's C API (see charts.hpp).
#include "charts.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "cli_error.hpp"
#include "outputs.hpp"

#if SOFTCE_HAVE_PLPLOT
#include <plplot.h>
#endif

namespace softce::cli {

#if SOFTCE_HAVE_PLPLOT

namespace {

constexpr const char* device = "pngcairo";

// PLplot calls this on a fatal error and then exits with the status returned (it cannot be
// made to return), so remove the staged outputs here: no output is left behind.
int on_plplot_error(const char* message) {
  std::fprintf(stderr, "softce: error: plotting failed: %s\n", message ? message : "PLplot error");
  remove_all_staged_outputs();
  return 2;
}

// Starts a PNG stream: white background, colour 15 black for axes and text.
void begin(const std::string& path, int width, int height, int columns, int rows) {
  plsexit(on_plplot_error);
  plsdev(device);
  plsfnam(path.c_str());
  plspage(0, 0, width, height, 0, 0);
  plscolbg(255, 255, 255);
  plscol0(15, 0, 0, 0);
  plscol0(14, 200, 200, 200);  // grid / bar outline grey
  plscol0(13, 150, 180, 220);  // bar fill
  plssub(columns, rows);
  plinit();
  plfontld(1);
}

void set_color(int index, const chart_series& s) { plscol0(index, s.red, s.green, s.blue); }

struct viewport { double x0 = 0.22, x1 = 0.95, y0 = 0.19, y1 = 0.88; };

void axes(const viewport& v, double x0, double x1, double y0, double y1, const char* x_label,
          const char* y_label, const std::string& title, double x_tick = 0) {
  plvpor(v.x0, v.x1, v.y0, v.y1);
  plwind(x0, x1, y0, y1);
  plcol0(14);
  plwidth(0.5);
  plbox("g", x_tick, 0, "g", 0, 0);
  plcol0(15);
  plwidth(1);
  plbox("bcnst", x_tick, 0, "bcnstv", 0, 0);
  pllab(x_label, y_label, title.c_str());
}

void legend(const std::vector<chart_series>& series, PLINT position, double text_scale,
            double line_length = 0.06) {
  const int n = static_cast<int>(series.size());
  std::vector<PLINT> opt(n, PL_LEGEND_LINE), text_colors(n, 15), line_colors(n), line_styles(n);
  std::vector<PLFLT> line_widths(n, 2.0);
  std::vector<const char*> text(n);
  for (int i = 0; i < n; ++i) {
    line_colors[i] = 1 + i;
    line_styles[i] = series[i].line_style;
    text[i] = series[i].name.c_str();
  }
  PLFLT width, height;
  pllegend(&width, &height, PL_LEGEND_BACKGROUND | PL_LEGEND_BOUNDING_BOX, position, 0.02,
           0.02, line_length, 0, 15, 1, 0, 0, n, opt.data(), 1.0, text_scale, 1.8, 0.0,
           text_colors.data(), text.data(), nullptr, nullptr, nullptr, nullptr,
           line_colors.data(), line_styles.data(), line_widths.data(), nullptr, nullptr, nullptr,
           nullptr);
}

void curve(const std::vector<double>& x, const std::vector<double>& y, int color, int style) {
  if (x.empty()) return;
  plcol0(color);
  pllsty(style);
  plwidth(2);
  plline(static_cast<PLINT>(x.size()), x.data(), y.data());
  if (x.size() <= 30) plpoin(static_cast<PLINT>(x.size()), x.data(), y.data(), 17);
  pllsty(1);
  plwidth(1);
}

std::string fixed(double v, int digits) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.*f", digits, v);
  return buffer;
}

}  // namespace

std::string charts_unavailable_reason() {
  const char** menu = nullptr;
  const char** names = nullptr;
  int count = 64;
  std::vector<const char*> menu_storage(count), name_storage(count);
  menu = menu_storage.data();
  names = name_storage.data();
  plgFileDevs(&menu, &names, &count);
  for (int i = 0; i < count; ++i)
    if (names[i] && std::string(names[i]) == device) return {};
  return "PLplot's pngcairo device is not available (install the Debian package "
         "plplot-driver-cairo)";
}

std::string plotting_library_version() {
  char version[80] = {};
  plgver(version);
  return std::string("PLplot ") + version;
}

void write_reliability_png(const std::string& path, const std::vector<chart_series>& series) {
  const int panels = static_cast<int>(series.size()) + 1;
  const int columns = 3, rows = (panels + columns - 1) / columns;
  begin(path, 1500, 500 * rows, columns, rows);
  plschr(0, 0.95);
  for (std::size_t i = 0; i < series.size(); ++i) set_color(1 + static_cast<int>(i), series[i]);
  const double diagonal_x[2] = {0, 1}, diagonal_y[2] = {0, 1};
  for (const auto& s : series) {
    pladv(0);
    axes(viewport{}, 0, 1, 0, 1, "confidence (max probability)", "accuracy",
         s.name + "   ECE " + fixed(s.ece, 4));
    for (const auto& b : s.bins) {
      if (b.count == 0) continue;
      PLFLT x[4] = {b.lower, b.lower, b.upper, b.upper};
      PLFLT y[4] = {0, b.accuracy, b.accuracy, 0};
      plcol0(13);
      plfill(4, x, y);
      plcol0(15);
      plline(4, x, y);
    }
    plcol0(15);
    pllsty(2);
    plline(2, diagonal_x, diagonal_y);
    pllsty(1);
  }
  pladv(0);
  axes(viewport{}, 0, 1, 0, 1, "confidence (max probability)", "accuracy",
       "all models (bin means)");
  plcol0(15);
  pllsty(2);
  plline(2, diagonal_x, diagonal_y);
  pllsty(1);
  for (std::size_t i = 0; i < series.size(); ++i) {
    std::vector<double> x, y;
    for (const auto& b : series[i].bins)
      if (b.count > 0) x.push_back(b.confidence), y.push_back(b.accuracy);
    curve(x, y, 1 + static_cast<int>(i), series[i].line_style);
  }
  // bottom right: below the diagonal at high confidence, where calibrated curves are not
  legend(series, PL_POSITION_VIEWPORT | PL_POSITION_INSIDE | PL_POSITION_BOTTOM | PL_POSITION_RIGHT,
         0.65);
  plend();
}

void write_accuracy_nll_png(const std::string& path, const std::vector<chart_series>& series) {
  // one page, two panels side by side and the legend at the right
  begin(path, 1600, 600, 1, 1);
  plschr(0, 0.95);
  for (std::size_t i = 0; i < series.size(); ++i) set_color(1 + static_cast<int>(i), series[i]);
  std::size_t epochs = 0;
  double acc_lo = 1, acc_hi = 0, nll_lo = 1e300, nll_hi = 0;
  for (const auto& s : series) {
    epochs = std::max(epochs, s.accuracy.size());
    for (double a : s.accuracy) acc_lo = std::min(acc_lo, a), acc_hi = std::max(acc_hi, a);
    for (double v : s.nll) nll_lo = std::min(nll_lo, v), nll_hi = std::max(nll_hi, v);
  }
  if (epochs == 0) epochs = 1;
  const double acc_pad = std::max(0.005, (acc_hi - acc_lo) * 0.08);
  const double nll_pad = std::max(0.005, (nll_hi - nll_lo) * 0.08);
  const double x_hi = std::max<double>(2, static_cast<double>(epochs));
  const double x_tick = epochs <= 12 ? 1 : 0;
  pladv(0);
  for (int panel = 0; panel < 2; ++panel) {
    const viewport v = panel == 0 ? viewport{0.08, 0.395, 0.14, 0.90}
                                  : viewport{0.485, 0.80, 0.14, 0.90};
    if (panel == 0)
      axes(v, 1, x_hi, std::max(0.0, acc_lo - acc_pad), std::min(1.0, acc_hi + acc_pad), "epoch",
           "test accuracy", "test accuracy (higher is better)", x_tick);
    else
      axes(v, 1, x_hi, std::max(0.0, nll_lo - nll_pad), nll_hi + nll_pad, "epoch", "test NLL",
           "test NLL (lower is better)", x_tick);
    for (std::size_t i = 0; i < series.size(); ++i) {
      const auto& y = panel == 0 ? series[i].accuracy : series[i].nll;
      std::vector<double> x(y.size());
      for (std::size_t e = 0; e < y.size(); ++e) x[e] = static_cast<double>(e + 1);
      curve(x, y, 1 + static_cast<int>(i), series[i].line_style);
    }
  }
  legend(series, PL_POSITION_VIEWPORT | PL_POSITION_OUTSIDE | PL_POSITION_RIGHT, 0.8, 0.04);
  plend();
}

#else  // built without PLplot

std::string charts_unavailable_reason() {
  return "softce was built without PLplot (install libplplot-dev and rebuild)";
}
std::string plotting_library_version() { return "none"; }
void write_reliability_png(const std::string&, const std::vector<chart_series>&) {}
void write_accuracy_nll_png(const std::string&, const std::vector<chart_series>&) {}

#endif

}  // namespace softce::cli
