//! Plain-text tables for people: left-aligned columns separated by three spaces, as kubectl prints them.

/// A table: a header row and data rows of the same width.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells print empty and extra cells are dropped, so a short row cannot panic.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.header.len();
        fn cell(row: &[String], i: usize) -> &str {
            row.get(i).map(String::as_str).unwrap_or("")
        }
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, width) in widths.iter_mut().enumerate() {
                *width = (*width).max(cell(row, i).chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let text = cell(row, i);
                line.push_str(text);
                if i + 1 < columns {
                    let pad = width - text.chars().count() + 3;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            // The last column is not padded, but an empty last cell would still leave the separator.
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_to_the_widest_cell() {
        let mut t = Table::new(&["A", "LONGER", "C"]);
        t.row(vec!["wide-cell".into(), "x".into(), "end".into()]);
        t.row(vec!["y".into(), "z".into(), String::new()]);
        assert_eq!(
            t.render(),
            "A           LONGER   C\n\
             wide-cell   x        end\n\
             y           z\n"
        );
    }

    #[test]
    fn short_and_long_rows_do_not_panic() {
        let mut t = Table::new(&["A", "B"]);
        t.row(vec!["only".into()]);
        t.row(vec!["1".into(), "2".into(), "dropped".into()]);
        assert_eq!(t.render(), "A      B\nonly\n1      2\n");
    }
}
